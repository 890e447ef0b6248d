//! Training throughput of the engine: `cargo run --release -p audit-nn --example bench_train --
//! ARCH CxHxW STEPS` trains a zoo model on random data (batch 128, SGD momentum 0.9, BN in train
//! mode) and prints one JSON line with images per second (warm-up steps excluded).

use audit_nn::tch::{Device, Kind, Tensor};
use audit_nn::train::{DeviceData, Hooks, Preprocess, TrainConfig, Trainer};
use audit_nn::{zoo, Model};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arch: zoo::Arch = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("small-cnn")
        .parse()
        .expect("arch");
    let chw: Vec<i64> = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("1x28x28")
        .split('x')
        .map(|v| v.parse().expect("CxHxW"))
        .collect();
    let steps: i64 = args.get(3).map(|s| s.parse().expect("steps")).unwrap_or(50);
    let batch = 128i64;
    let device = audit_nn::resolve_device(
        args.get(4)
            .map(String::as_str)
            .unwrap_or("cpu")
            .parse()
            .expect("device"),
    )
    .expect("device");
    let proto = zoo::build(arch, [chw[0], chw[1], chw[2]], 10, 0).expect("zoo");
    let mut model = Model::load(&zoo::to_bytes(&proto), None).expect("load");
    model.to_device(device);
    audit_nn::tch::manual_seed(0);
    let n = batch * steps;
    let x = Tensor::randint(256, [n, chw[0], chw[1], chw[2]], (Kind::Uint8, Device::Cpu));
    let y = Tensor::randint(10, [n], (Kind::Int64, Device::Cpu));
    let warm = DeviceData::new(&x.narrow(0, 0, batch * 3), &y.narrow(0, 0, batch * 3), device);
    let data = DeviceData::new(&x, &y, device);
    let mut trainer = Trainer::new(
        &model,
        TrainConfig {
            batch_size: batch,
            lr: 0.01,
            ..Default::default()
        },
    )
    .expect("trainer");
    trainer
        .epoch(&model, &warm, &Preprocess::default(), &mut Hooks::none())
        .expect("warm-up");
    let stats = trainer
        .epoch(&model, &data, &Preprocess::default(), &mut Hooks::none())
        .expect("train");
    println!(
        "{{\"engine\":\"audit-nn\",\"arch\":\"{arch}\",\"input\":\"{}\",\"batch\":{batch},\"images\":{n},\"seconds\":{:.4},\"images_per_second\":{:.1},\"device\":\"{}\",\"threads\":{}}}",
        args.get(2).map(String::as_str).unwrap_or("1x28x28"),
        stats.seconds,
        n as f64 / stats.seconds,
        if device.is_cuda() { "cuda" } else { "cpu" },
        audit_nn::tch::get_num_threads()
    );
}
