//! Each model's own kernel threads.
//!
//! Design note. The engine's kernels split their work on rayon. With the one global pool, a
//! small model's engine call waits behind whatever a large model's call has queued there: a
//! flood of big batches on one model made a tiny classifier's p99 climb to a quarter of a
//! second on two cores. Each loaded model therefore runs its engine calls in a pool of its own
//! (as many threads as the global one): the models' threads share the cores through the OS
//! scheduler, so a busy model slows another only by sharing CPU time, never by a queue. The
//! pool lives as long as the model's worker thread and goes with it.

use std::sync::Arc;

/// A pool of rayon threads for `model`'s engine calls.
pub fn for_model(model: &str) -> std::io::Result<Arc<rayon::ThreadPool>> {
    let name = format!("kiln-{model}");
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map(Arc::new)
        .map_err(std::io::Error::other)
}
