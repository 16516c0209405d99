//! f32 linear layers on kiln's panel GEMM (the CPU backend's default f32 path, weights packed at
//! load) beside the `gemm` crate (the `[in, out]` path), at all-MiniLM-L6-v2's shapes and a
//! GPT-2-small prefill of 8 × 128 tokens.
//!
//! `cargo bench -p kiln-engine --bench gemm_f32 [-- THREADS]`. Prints the median and the best
//! time per call and GFLOP/s (2·m·k·n per call, bias included).

use std::time::Duration;

use kiln_engine::kernels::{gemm, panel_gemm};

#[path = "../../quant/benches/common/mod.rs"]
mod common;
use common::{data, time};

fn main() {
    let threads = common::threads_from_args();
    let budget = Duration::from_millis(1500);
    println!("threads {threads}");
    println!(
        "| model | m×k×n | panel ms (median / best) | panel GFLOP/s (median / best) | gemm crate ms | gemm crate GFLOP/s |"
    );
    println!("|---|---|---|---|---|---|");
    let shapes: &[(&str, usize, usize, usize)] = &[
        ("L1-resident", 12, 256, 32),
        ("L1-resident", 48, 128, 64),
        ("MiniLM 1×16", 16, 384, 384),
        ("MiniLM 1×16", 16, 384, 1536),
        ("MiniLM 1×16", 16, 1536, 384),
        ("MiniLM 32×128", 4096, 384, 384),
        ("MiniLM 32×128", 4096, 384, 1536),
        ("MiniLM 32×128", 4096, 1536, 384),
        ("GPT-2 8×128", 1024, 768, 2304),
        ("GPT-2 8×128", 1024, 768, 768),
        ("GPT-2 8×128", 1024, 768, 3072),
        ("GPT-2 8×128", 1024, 3072, 768),
    ];
    for &(model, m, k, n) in shapes {
        let x = data(m * k, 1);
        let w = data(n * k, 2); // [out, in]
        let bias = data(n, 3);
        let packed = panel_gemm::pack(&w, n, k);
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [in, out]
        let mut y = vec![0.0f32; m * n];
        let (p_med, p_best) = time(budget, || {
            panel_gemm::linear(&mut y, &x, &packed, m, k, n, Some(&bias), None, threads);
        });
        let (g_med, _) = time(budget, || {
            gemm::linear(&mut y, &x, &wt, m, k, n, Some(&bias), None, threads);
        });
        let gflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
        println!(
            "| {model} | {m}×{k}×{n} | {:.3} / {:.3} | {:.1} / {:.1} | {:.3} | {:.1} |",
            p_med * 1e3,
            p_best * 1e3,
            gflops(p_med),
            gflops(p_best),
            g_med * 1e3,
            gflops(g_med),
        );
    }
}
