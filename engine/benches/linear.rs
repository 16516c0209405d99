//! Linear layers at all-MiniLM-L6-v2's shapes: f32 (kiln's panel GEMM on pre-packed weights,
//! what the CPU backend runs) against the int8 kernels (dynamic and static activation
//! quantization, fused) and bf16.
//!
//! `cargo bench -p kiln-engine --bench linear [-- THREADS]`. Prints median time per call and
//! GFLOP/s (f32, bf16) or GOPS (int8), counting 2·m·k·n operations, quantization and the bias
//! included in the int8 and bf16 times.

use std::time::Duration;

use kiln_engine::kernels::panel_gemm;
use kiln_quant::bf16::{Bf16Kernel, Bf16Weights};
use kiln_quant::{ActParams, ActQuant, Int8Kernel, Int8Weights};

#[path = "../../quant/benches/common/mod.rs"]
mod common;

/// Median seconds per call (see [`common::time`]).
fn time(budget: Duration, f: impl FnMut()) -> f64 {
    common::time(budget, f).0
}
use common::data;

fn main() {
    let threads = common::threads_from_args();
    let budget = Duration::from_millis(1500);
    let (i8k, bfk) = (Int8Kernel::detect(), Bf16Kernel::detect());
    println!("threads {threads}, int8 kernel {i8k}, bf16 kernel {bfk}");
    println!(
        "| m×k×n | f32 ms | f32 GFLOP/s | int8-dynamic ms | GOPS | int8-static ms | GOPS | ×f32 (dyn/static) | bf16 ms | GFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // MiniLM's linears: QKV/output (384→384), FFN up (384→1536), FFN down (1536→384), for 1×16 and
    // 32×128 tokens.
    for m in [16usize, 4096] {
        for (k, n) in [(384usize, 384usize), (384, 1536), (1536, 384)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let bias = data(n, 3);
            let packed = panel_gemm::pack(&w, n, k);
            let mut y = vec![0.0f32; m * n];
            let f32_s = time(budget, || {
                panel_gemm::linear(&mut y, &x, &packed, m, k, n, Some(&bias), None, threads);
            });
            let q = Int8Weights::pack(&w, n, k, i8k).unwrap();
            let dyn_s = time(budget, || {
                kiln_quant::int8::linear(
                    &x,
                    m,
                    &q,
                    Some(&bias),
                    ActQuant::Dynamic,
                    &mut y,
                    threads,
                )
                .unwrap();
            });
            let st = ActQuant::Static(ActParams::from_range(-1.0, 1.0));
            let static_s = time(budget, || {
                kiln_quant::int8::linear(&x, m, &q, Some(&bias), st, &mut y, threads).unwrap();
            });
            let b = Bf16Weights::pack(&w, n, k, bfk).unwrap();
            let bf_s = time(budget, || {
                kiln_quant::bf16::linear(&x, m, &b, Some(&bias), &mut y, threads).unwrap();
            });
            let ops = 2.0 * (m * k * n) as f64;
            println!(
                "| {m}×{k}×{n} | {:.3} | {:.1} | {:.3} | {:.1} | {:.3} | {:.1} | {:.2}/{:.2} | {:.3} | {:.1} |",
                f32_s * 1e3,
                ops / f32_s / 1e9,
                dyn_s * 1e3,
                ops / dyn_s / 1e9,
                static_s * 1e3,
                ops / static_s / 1e9,
                f32_s / dyn_s,
                f32_s / static_s,
                bf_s * 1e3,
                ops / bf_s / 1e9,
            );
        }
    }
}
