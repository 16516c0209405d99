//! Attention on every device: the `Sdpa` op as a one-node plan, flash against math, on kiln's
//! CPU kernels and on each wgpu adapter (Mesa's lavapipe where there is no GPU).
//!
//! `cargo bench -p kiln-engine --features wgpu --bench sdpa_devices [-- SEQ HEADS ITERS]`
//! (defaults 4096, 1, 3; head_dim 64, batch 1, causal). The first run of each plan is a warm-up
//! that includes burn's autotune on a GPU and is reported apart; then the median of ITERS runs.
//! GFLOP/s counts the full `4·S²·d` per head (causal work is about half of it).

use std::time::Instant;

use kiln_engine::ir::{AttnMask, DType, Dim, GraphBuilder, Op};
use kiln_engine::{DeviceKind, ExecOptions, HostTensor, SdpaKernel, SdpaKernelChoice, prepare};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .filter(|a| !a.starts_with('-'))
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (seq, heads, iters) = (arg(1, 4096), arg(2, 1), arg(3, 3).max(1));
    let d = 64;
    let shape = [1, heads, seq, d];
    let dims: Vec<Dim> = shape.iter().map(|&n| Dim::Fixed(n)).collect();
    let values = |seed: usize| -> Vec<f32> {
        (0..shape.iter().product::<usize>())
            .map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    };
    let feeds: Vec<(String, HostTensor)> = ["q", "k", "v"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                HostTensor::f32(shape.to_vec(), values(i)).unwrap(),
            )
        })
        .collect();
    let flops = 4.0 * (seq * seq * d * heads) as f64;
    let mut devices = vec![DeviceKind::Cpu];
    devices.extend(DeviceKind::available().into_iter().filter(|d| d.is_gpu()));
    for a in kiln_engine::gpu::adapters() {
        println!("wgpu:{} = {}", a.index, a.describe());
    }
    println!("causal attention, batch 1, {heads} head(s), head_dim {d}, S = {seq}; {iters} runs");
    println!("| device | kernel (ran) | first run ms | median ms | GFLOP/s |");
    println!("|---|---|---|---|---|");
    for device in devices {
        for kernel in [SdpaKernel::Flash, SdpaKernel::Math] {
            let mut g = GraphBuilder::new();
            let q = g.input("q", DType::F32, &dims).unwrap();
            let k = g.input("k", DType::F32, &dims).unwrap();
            let v = g.input("v", DType::F32, &dims).unwrap();
            let sdpa = Op::Sdpa {
                mask: AttnMask::Causal,
                scale: None,
            };
            let out = g.push(sdpa, &[q, k, v], "sdpa").unwrap();
            let graph = g.finish(vec![("out".into(), out)]).unwrap();
            let exec = ExecOptions {
                sdpa_kernel: SdpaKernelChoice::Force(kernel),
                ..ExecOptions::default()
            };
            let plan = prepare(graph, device, exec).unwrap();
            let started = Instant::now();
            if let Err(e) = plan.run(&feeds) {
                println!("| {device} | {kernel} | refused: {e} | | |");
                continue;
            }
            let first = started.elapsed().as_secs_f64() * 1e3;
            let mut times: Vec<f64> = (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    plan.run(&feeds).unwrap();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let ran = plan
                .sdpa_kernel_counts()
                .first()
                .map_or("?", |(name, _)| *name);
            println!(
                "| {device} | {kernel} ({ran}) | {first:.1} | {median:.1} | {:.1} |",
                flops / median / 1e6
            );
        }
    }
}
