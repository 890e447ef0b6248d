//! Build-script helpers shared by the crates whose binaries load libtorch (a build-dependency
//! only; nothing here is linked into a program).

use std::path::Path;

/// Embeds an rpath to libtorch's `lib` folder (from `LIBTORCH`, which .cargo/config.toml sets
/// to the set-up's `.venv/libtorch`) into this crate's own binaries and test binaries, so they
/// run without LD_LIBRARY_PATH. A plugin library does not need it: it finds libtorch through the
/// host process, which has it loaded already. Call it from `build.rs`.
pub fn libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = Path::new(&libtorch).join("lib");
        let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
