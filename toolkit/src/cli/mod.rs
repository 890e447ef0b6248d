//! The command line: one module per command family; the argument groups several commands share
//! (data, preprocessing, device, the defense-run options of harden and compare) and their
//! resolution into settings live in `args`.

mod args;
mod attack;
mod compare;
mod doctor;
mod eval;
pub(crate) mod grid;
pub(crate) mod harden;
mod inspect;
mod plugins;
mod report;
mod scan;
mod templates;
mod zoo;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{self, EXIT_OK};

/// Audit image classifiers for backdoors and harden them.
#[derive(Debug, Parser)]
#[command(name = "audit", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Also search this folder for plugins (before AUDIT_PLUGIN_PATH and the folder beside the binary).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List, inspect, check, install, run and create plugins.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Inputs, outputs, opset, parameters, neurons and unsupported ops of an ONNX model.
    Inspect(inspect::InspectArgs),
    /// Poison the training data with an attack plugin, train a model on it, export it.
    Attack(attack::AttackArgs),
    /// Harden a model with a defense (NONE by default) and write the hardened ONNX model.
    Harden(harden::HardenArgs),
    /// Run several defenses on the same model and data; compare them in a table and a report.
    Compare(compare::CompareArgs),
    /// Grids of models x attacks x defenses x seeds: plan, run on Slurm, Kubernetes or here, resume, merge.
    #[command(subcommand)]
    Grid(grid::GridCommand),
    /// Scan a model with detector plugins: is it backdoored, towards which class (exit 3 when flagged).
    Scan(scan::ScanArgs),
    /// Re-render a JSON report (from compare or harden) as a table, Markdown or HTML.
    Report(report::ReportArgs),
    /// Clean accuracy, attack success rate and robust accuracy of an ONNX model (onnxruntime).
    Eval(eval::EvalArgs),
    /// Write a freshly initialised model of a zoo architecture.
    Zoo(zoo::ZooArgs),
    /// Show what this installation has: libtorch, onnxruntime, devices, plugins, data.
    Doctor {
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { error::EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    crate::signals::install();
    let result = match cli.command {
        Command::Plugins(cmd) => plugins::run(cmd, &cli.global),
        Command::Doctor { json } => doctor::run(&cli.global, json),
        Command::Inspect(args) => inspect::run(args),
        Command::Eval(args) => eval::run(args, &cli.global),
        Command::Attack(args) => attack::run(args, &cli.global),
        Command::Harden(args) => harden::run(args, &cli.global),
        Command::Compare(args) => compare::run(args, &cli.global),
        Command::Scan(args) => scan::run(args, &cli.global),
        Command::Grid(cmd) => grid::run(cmd, &cli.global),
        Command::Report(args) => report::run(args),
        Command::Zoo(args) => zoo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) if error::exit_code(&err) == error::EXIT_CANCELLED => {
            eprintln!("audit: cancelled ({err:#}); no output was written");
            error::EXIT_CANCELLED
        }
        Err(err) => {
            eprintln!("audit: error: {err:#}");
            if let Some(hint) = error::hint(&err) {
                eprintln!("\nhint: {hint}");
            }
            error::exit_code(&err)
        }
    }
}
