//! The int8 linear layer alone, at all-MiniLM-L6-v2's shapes: the kernel this CPU detects, dynamic
//! and static activation quantization, quantization, bias and dequantization included.
//!
//! `cargo bench -p kiln-quant --bench int8 [-- THREADS]`. Prints the median time per call and GOPS
//! (2·m·k·n operations). `engine/benches/linear.rs` puts the same layers beside f32 and bf16; this
//! one builds in seconds, for working on the kernel.

use std::time::Duration;

use kiln_quant::{ActParams, ActQuant, Int8Kernel, Int8Weights};

mod common;
use common::{data, time};

fn main() {
    let threads = common::threads_from_args();
    let budget = Duration::from_millis(1000);
    let kernel = Int8Kernel::detect();
    println!("threads {threads}, int8 kernel {kernel}");
    println!("| m×k×n | dynamic ms | GOPS (best) | static ms | GOPS (best) |");
    println!("|---|---|---|---|---|");
    for m in [16usize, 4096] {
        for (k, n) in [(384usize, 384usize), (384, 1536), (1536, 384)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let bias = data(n, 3);
            let mut y = vec![0.0f32; m * n];
            let q = Int8Weights::pack(&w, n, k, kernel).unwrap();
            let mut run = |act| {
                time(budget, || {
                    kiln_quant::int8::linear(&x, m, &q, Some(&bias), act, &mut y, threads).unwrap();
                })
            };
            let (dynamic, dynamic_best) = run(ActQuant::Dynamic);
            let (fixed, fixed_best) = run(ActQuant::Static(ActParams::from_range(-1.0, 1.0)));
            let ops = 2.0 * (m * k * n) as f64;
            println!(
                "| {m}×{k}×{n} | {:.3} | {:.1} ({:.1}) | {:.3} | {:.1} ({:.1}) |",
                dynamic * 1e3,
                ops / dynamic / 1e9,
                ops / dynamic_best / 1e9,
                fixed * 1e3,
                ops / fixed / 1e9,
                ops / fixed_best / 1e9,
            );
        }
    }
}
