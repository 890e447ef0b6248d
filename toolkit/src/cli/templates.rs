//! `audit plugins new`: renders a plugin project from the templates in `examples/templates/`.
//!
//! The templates are compiled into the binary, so a user needs only `audit` to start a plugin.
//! `examples/rust-plugin` and `examples/c-plugin` are renderings of these same templates, and a
//! test checks they stay identical.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::error::{input_error, input_error_hint, EXIT_OK};
use crate::plugin::Kind;

/// Language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    C,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Plugin name: 1-64 characters of a-z, 0-9 and -.
    pub name: String,
    #[arg(long, value_enum)]
    pub kind: Kind,
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// Folder to create (default: ./NAME). Must not exist or be empty.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Path written into the project for the SDK (Rust: audit-sdk crate; C: folder of audit_plugin.h).
    /// Default: this checkout's sdk/rust or sdk/include.
    #[arg(long)]
    pub sdk: Option<String>,
}

macro_rules! template {
    ($path:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/templates/", $path))
    };
}

/// (file in the new project, template text) for a language and kind.
pub fn files(lang: Lang, kind: Kind) -> Vec<(&'static str, &'static str)> {
    match lang {
        Lang::Rust => vec![
            ("Cargo.toml", template!("rust/Cargo.toml")),
            ("README.md", template!("rust/README.md")),
            (
                "src/lib.rs",
                match kind {
                    Kind::Attack => template!("rust/attack.rs"),
                    Kind::Detector => template!("rust/detector.rs"),
                    Kind::Defense => template!("rust/defense.rs"),
                },
            ),
        ],
        Lang::C => vec![
            ("Makefile", template!("c/Makefile")),
            ("README.md", template!("c/README.md")),
            (
                "plugin.c",
                match kind {
                    Kind::Attack => template!("c/attack.c"),
                    Kind::Detector => template!("c/detector.c"),
                    Kind::Defense => template!("c/defense.c"),
                },
            ),
        ],
    }
}

/// Where this checkout's SDK lives (compiled in).
fn default_sdk(lang: Lang) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = match lang {
        Lang::Rust => root.join("sdk/rust"),
        Lang::C => root.join("sdk/include"),
    };
    std::fs::canonicalize(&dir).unwrap_or(dir).display().to_string()
}

/// Renders every file of a template: returns (relative path, contents).
pub fn render(name: &str, kind: Kind, lang: Lang, sdk: &str) -> Vec<(&'static str, String)> {
    let ident = name.replace('-', "_");
    let vars = [
        ("{{name}}", name.to_string()),
        ("{{crate_name}}", format!("audit-plugin-{name}")),
        ("{{lib_name}}", format!("audit_plugin_{ident}")),
        ("{{ident}}", ident.clone()),
        ("{{sdk_path}}", sdk.to_string()),
        ("{{include_dir}}", sdk.to_string()),
        ("{{kind}}", kind.as_str().to_string()),
    ];
    files(lang, kind)
        .into_iter()
        .map(|(path, text)| {
            let mut s = text.to_string();
            for (k, v) in &vars {
                s = s.replace(k, v);
            }
            (path, s)
        })
        .collect()
}

/// A new plugin's name: the host's rule ([`crate::plugin::valid_name`]), starting with a letter,
/// because it also names the generated crate and the C symbols' prefix.
fn valid_name(name: &str) -> bool {
    crate::plugin::valid_name(name) && name.as_bytes()[0].is_ascii_lowercase()
}

pub fn new(args: NewArgs) -> Result<i32> {
    if !valid_name(&args.name) {
        return Err(input_error(format!(
            "plugin name `{}`: use 1-64 characters of a-z, 0-9 and -, starting with a letter",
            args.name
        )));
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    if out.exists() && std::fs::read_dir(&out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(input_error_hint(
            format!("{} already exists and is not empty", out.display()),
            "choose another --out folder",
        ));
    }
    let sdk = args.sdk.clone().unwrap_or_else(|| default_sdk(args.lang));
    for (rel, text) in render(&args.name, args.kind, args.lang, &sdk) {
        let path = out.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "wrote a {:?} {} plugin `{}` to {}; build and load it with the commands in {}",
        args.lang,
        args.kind,
        args.name,
        out.display(),
        out.join("README.md").display()
    );
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed examples are renderings of the templates; regenerate them with
    /// `AUDIT_UPDATE_EXAMPLES=1 cargo test -p audit examples_are_fresh` when a template changes.
    #[test]
    fn examples_are_fresh() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let cases = [
            (
                "rust-plugin",
                "checkerboard",
                Kind::Attack,
                Lang::Rust,
                "../../sdk/rust",
            ),
            (
                "c-plugin",
                "c-pixel-outlier",
                Kind::Detector,
                Lang::C,
                "../../sdk/include",
            ),
        ];
        for (dir, name, kind, lang, sdk) in cases {
            for (rel, text) in render(name, kind, lang, sdk) {
                let path = root.join(dir).join(rel);
                if std::env::var_os("AUDIT_UPDATE_EXAMPLES").is_some() {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &text).unwrap();
                }
                let committed = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(
                    committed == text,
                    "{} is stale: rerun with AUDIT_UPDATE_EXAMPLES=1",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn renders_every_placeholder() {
        for lang in [Lang::Rust, Lang::C] {
            for kind in [Kind::Attack, Kind::Detector, Kind::Defense] {
                for (rel, text) in render("my-thing", kind, lang, "/sdk") {
                    assert!(!text.contains("{{"), "{rel} ({lang:?} {kind}) keeps a placeholder");
                }
            }
        }
        assert!(!valid_name("Bad_Name") && !valid_name("") && !valid_name("9x") && valid_name("my-attack2"));
    }
}
