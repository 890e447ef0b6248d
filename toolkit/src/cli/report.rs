//! `audit report REPORT.json [--out FILE ...]`: re-renders a report that `compare` or `harden`
//! wrote as JSON, as a terminal table or as Markdown / HTML / JSON files. Nothing is re-measured.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::error::EXIT_OK;
use crate::output::Outputs;
use crate::report::{self, Report};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A report written as JSON by `audit compare --report X.json` or `audit harden --report X.json`.
    pub input: PathBuf,
    /// Write it as .md, .html or .json (repeatable); without --out, print the table.
    #[arg(long = "out", value_name = "FILE")]
    pub outs: Vec<PathBuf>,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ReportArgs) -> Result<i32> {
    let mut outputs = Outputs::new(args.force, &[&args.input]);
    for o in &args.outs {
        report::Format::of(o)?;
        outputs.plan("--out", o)?;
    }
    let r = Report::read(&args.input)?;
    if args.outs.is_empty() {
        println!("{}", report::terminal_table(&r));
    }
    for o in &args.outs {
        outputs.stage(o, r.render(o)?.as_bytes())?;
    }
    outputs.commit()?;
    for o in &args.outs {
        println!("wrote {}", o.display());
    }
    Ok(EXIT_OK)
}
