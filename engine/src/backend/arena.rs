//! The CPU backend's arena: intermediate buffers are handed back when an op has consumed them
//! and handed out again to later ops, so a plan that has run once at a shape runs again with no
//! allocation for its intermediates.
//!
//! The executor frees each value at its last use (the memory plan's liveness); the ops of
//! [`super::CpuBackend`] return the buffers they consumed here, and take their outputs from
//! here, best fit first. Before a run, [`Arena::reserve`] tops the free list up to the buffer
//! sizes the plan's memory plan needs at the run's shape, so even a new shape allocates once,
//! up front, instead of per op.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffers smaller than this are not worth keeping (the allocator's small bins serve them).
const MIN_KEEP: usize = 1024;
/// At most this many free buffers are kept; beyond, the smallest are dropped.
const MAX_FREE: usize = 64;

#[derive(Debug, Default)]
pub struct Arena {
    free: Mutex<Vec<Vec<f32>>>,
    /// Buffers of at least `MIN_KEEP` elements allocated because none was free.
    allocations: AtomicU64,
}

impl Arena {
    /// A buffer of exactly `len` elements with unspecified contents (callers overwrite it).
    pub fn take(&self, len: usize) -> Vec<f32> {
        if len >= MIN_KEEP {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            // The buffer that needs the fewest new elements written (growing a Vec's length
            // zero-fills the new part), then the smallest that fits.
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| (len.saturating_sub(v.len()), v.capacity()))
                .map(|(i, _)| i);
            if let Some(i) = best {
                let mut v = free.swap_remove(i);
                drop(free);
                v.resize(len, 0.0);
                return v;
            }
            self.allocations.fetch_add(1, Ordering::Relaxed);
        }
        vec![0.0; len]
    }

    /// A buffer of `len` zeros.
    pub fn take_zeroed(&self, len: usize) -> Vec<f32> {
        let mut v = self.take(len);
        v.fill(0.0);
        v
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, v: Vec<f32>) {
        if v.capacity() < MIN_KEEP {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(v);
        if free.len() > MAX_FREE
            && let Some(i) = free
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
        {
            free.swap_remove(i);
        }
    }

    /// Makes sure buffers of these sizes are free (allocating those that are missing).
    pub fn reserve(&self, sizes: &[usize]) {
        let mut wanted: Vec<usize> = sizes.iter().copied().filter(|&s| s >= MIN_KEEP).collect();
        wanted.sort_unstable_by(|a, b| b.cmp(a));
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut used = vec![false; free.len()];
        let mut missing = Vec::new();
        for want in wanted {
            let fit = (0..free.len())
                .filter(|&i| !used[i] && free[i].capacity() >= want)
                .min_by_key(|&i| free[i].capacity());
            match fit {
                Some(i) => used[i] = true,
                None => missing.push(want),
            }
        }
        for want in missing {
            if free.len() >= MAX_FREE {
                break;
            }
            self.allocations.fetch_add(1, Ordering::Relaxed);
            free.push(vec![0.0; want]);
        }
    }

    /// Buffers allocated because the arena had none free (cumulative).
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Elements held in free buffers.
    pub fn free_elems(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter().map(Vec::capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_best_fit_first() {
        let a = Arena::default();
        let big = a.take(10_000);
        let small = a.take(2_000);
        assert_eq!(a.allocations(), 2);
        a.give(big);
        a.give(small);
        let x = a.take(1_500);
        assert!(x.capacity() < 10_000, "best fit picks the 2000 buffer");
        let y = a.take(9_000);
        assert_eq!(y.len(), 9_000);
        assert_eq!(a.allocations(), 2, "both came from the free list");
        let _z = a.take(50_000);
        assert_eq!(a.allocations(), 3);
    }

    #[test]
    fn reserve_allocates_only_what_is_missing() {
        let a = Arena::default();
        a.reserve(&[5_000, 5_000, 100]);
        assert_eq!(a.allocations(), 2, "tiny buffers are not pooled");
        a.reserve(&[4_000, 5_000]);
        assert_eq!(a.allocations(), 2);
        let _x = a.take(5_000);
        let _y = a.take(5_000);
        assert_eq!(a.allocations(), 2);
    }
}
