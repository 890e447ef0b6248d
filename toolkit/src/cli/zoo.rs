//! `audit zoo ARCH --input CxHxW --classes N --out M.onnx`: a freshly initialised model from the
//! engine's zoo, BatchNormalization kept, trainable from scratch.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::inspect::parse_chw;
use crate::error::{input_error, EXIT_OK};
use crate::output::Outputs;

#[derive(Debug, Args)]
pub struct ZooArgs {
    /// small-cnn, nin, vgg11, vgg16, resnet18 or preact-resnet18.
    pub arch: String,
    /// Input size CxHxW (Fashion-MNIST: 1x28x28, CIFAR: 3x32x32).
    #[arg(long, value_parser = parse_chw)]
    pub input: [i64; 3],
    #[arg(long, default_value_t = 10)]
    pub classes: i64,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ZooArgs) -> Result<i32> {
    let mut outputs = Outputs::new(args.force, &[]);
    outputs.plan("--out", &args.out)?;
    let arch: audit_nn::zoo::Arch = args.arch.parse().map_err(|e: String| input_error(e))?;
    let proto = audit_nn::zoo::build(arch, args.input, args.classes, args.seed).map_err(input_error)?;
    let bytes = audit_nn::zoo::to_bytes(&proto);
    let model = audit_nn::Model::load(&bytes, None)?;
    outputs.stage(&args.out, &bytes)?;
    outputs.commit()?;
    let [c, h, w] = args.input;
    println!(
        "wrote {} ({arch}, input {c}x{h}x{w}, {} classes, {} trainable parameters, {} neuron layers)",
        args.out.display(),
        args.classes,
        model.parameter_count(),
        model.layers().len()
    );
    Ok(EXIT_OK)
}
