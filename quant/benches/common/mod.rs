//! Helpers shared by the linear-layer benches (`quant/benches/int8.rs` and, through a `#[path]`
//! include, `engine/benches/linear.rs`): seeded inputs and a call timer.

use std::time::{Duration, Instant};

/// `n` values in [-1, 1) from a xorshift stream seeded by `seed`.
pub fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 2.0
        })
        .collect()
}

/// Median and fastest seconds per call over at least 5 calls and about `budget` (at most 2000
/// calls). On a shared VM the fastest call shows what the kernel can do; the median what a user
/// sees.
pub fn time(budget: Duration, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < budget && times.len() < 2000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// The thread count from the first numeric command-line argument (default: all CPUs), with
/// rayon's global pool built to match.
pub fn threads_from_args() -> usize {
    let threads: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    threads
}
