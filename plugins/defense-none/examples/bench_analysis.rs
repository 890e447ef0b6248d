//! NONE's analysis (neuron selection + Jenks) on fixed activations: `cargo run --release -p
//! audit-plugin-none --example bench_analysis -- OUTDIR` writes the activations as .npy (so the
//! reference-style Python loop can run on exactly the same arrays) and prints one JSON line with
//! the median time of 3 runs.

use audit_nn::tch::{Device, Kind, Tensor};
use audit_plugin_none::{jenks_break, select_neurons};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("OUTDIR"));
    std::fs::create_dir_all(&out).expect("OUTDIR");
    audit_nn::tch::manual_seed(0);
    let (n, k) = (60_000i64, 10i64);
    let widths = [32i64, 64, 128];
    let logits = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 4.0;
    let probs = logits.softmax(-1, Kind::Float);
    let acts: Vec<Tensor> = widths
        .iter()
        .map(|&c| Tensor::randn([n, c], (Kind::Float, Device::Cpu)).relu())
        .collect();
    probs.write_npy(out.join("probs.npy")).expect("write");
    for (i, a) in acts.iter().enumerate() {
        a.write_npy(out.join(format!("act{i}.npy"))).expect("write");
    }
    let mut times = Vec::new();
    let mut selected = Vec::new();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let sel = select_neurons(&probs, &acts, 0.9, 0.1, 0.05);
        let brk = jenks_break(&sel.h);
        times.push(t.elapsed().as_secs_f64());
        selected = sel.neurons.clone();
        let _ = brk;
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{{\"impl\":\"audit (vectorised, libtorch)\",\"samples\":{n},\"classes\":{k},\"layer_widths\":{widths:?},\"median_seconds\":{:.4},\"selected\":{:?},\"threads\":{}}}",
        times[1],
        selected,
        audit_nn::tch::get_num_threads()
    );
}
