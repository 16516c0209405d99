//! SDPA kernels at B=1, H=12, D=64 (the shapes, and PyTorch's CPU baselines in
//! `../shared/baselines/results.md`), plus short lengths where the selector's math/flash
//! crossover is decided.
//!
//! `cargo bench -p kiln-attention --bench sdpa` prints criterion's timings and, first, a table of
//! each kernel's peak extra heap memory for one call (a counting allocator: bytes allocated
//! beyond q, k, v and out while the call runs, including rayon's per-thread scratch).
//! `KILN_BENCH_LENGTHS=128,512` restricts the lengths.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kiln_attention::{
    Kernel, KernelChoice, Mask, SdpaParams, SdpaShape, scaled_dot_product_attention,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const HEADS: usize = 12;
const HEAD_DIM: usize = 64;

fn lengths() -> Vec<usize> {
    std::env::var("KILN_BENCH_LENGTHS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 32, 64, 128, 256, 512, 2048, 4096])
}

fn problem(s: usize) -> (SdpaShape, Vec<f32>) {
    let shape = SdpaShape {
        batch: 1,
        q_heads: HEADS,
        kv_heads: HEADS,
        q_len: s,
        kv_len: s,
        head_dim: HEAD_DIM,
    };
    let data = (0..shape.q_elems())
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    (shape, data)
}

fn run(shape: SdpaShape, x: &[f32], out: &mut [f32], kernel: Kernel) {
    let params = SdpaParams {
        shape,
        mask: Mask::None,
        scale: None,
    };
    scaled_dot_product_attention(x, x, x, out, &params, KernelChoice::Force(kernel)).unwrap();
}

fn peak_memory_table() {
    println!("peak extra heap per call (MiB), B=1 H={HEADS} D={HEAD_DIM}:");
    println!("| S | kernel | peak extra MiB | H·S² f32 scores MiB |");
    for s in lengths() {
        let (shape, x) = problem(s);
        let mut out = vec![0.0f32; x.len()];
        for kernel in Kernel::ALL {
            run(shape, &x, &mut out, kernel); // warm rayon's threads
            let base = LIVE.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            run(shape, &x, &mut out, kernel);
            let extra = PEAK.load(Ordering::Relaxed) - base;
            let scores = (HEADS * s * s * 4) as f64 / 1048576.0;
            println!(
                "| {s} | {kernel} | {:.2} | {scores:.1} |",
                extra as f64 / 1048576.0
            );
        }
    }
}

fn bench(c: &mut Criterion) {
    peak_memory_table();
    let mut group = c.benchmark_group("sdpa_b1_h12_d64");
    group.sample_size(10);
    for s in lengths() {
        let (shape, x) = problem(s);
        let mut out = vec![0.0f32; x.len()];
        if s >= 2048 {
            group.measurement_time(std::time::Duration::from_secs(8));
        }
        for kernel in Kernel::ALL {
            group.bench_with_input(BenchmarkId::new(kernel.name(), s), &s, |b, _| {
                b.iter(|| run(shape, &x, &mut out, kernel))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
