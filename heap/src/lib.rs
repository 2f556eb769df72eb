//! The C heap's free pages, given back to the kernel.
//!
//! glibc's allocator keeps what a process frees: a page in the middle of
//! a heap, or in one of the per-thread arenas, stays in the process's RSS
//! until `malloc_trim(3)` walks the arenas and `madvise`s the free pages
//! away. A control plane that has just diffed a reconnect storm of Hellos,
//! or an agent whose libnftables has just parsed a full sync, frees far
//! more than it keeps; without a trim the RSS stays at the peak.
//!
//! [`trim`] is that one call behind a safe function. On C libraries other
//! than glibc it does nothing (musl returns freed memory by itself).

#![allow(unsafe_code)]

/// Gives the free pages of every malloc arena back to the kernel. Returns
/// whether any memory was released. Safe to call from any thread at any
/// time; it holds each arena's lock while it walks it, so callers run it
/// off the latency path (after a burst, on a blocking thread).
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim(3) takes any padding value (0 keeps no slack
        // at the top of the heap), is thread-safe, and only releases free
        // pages; no memory the process uses is touched.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// What the C heap holds, by glibc's count (`mallinfo2(3)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in allocated blocks, mapped ones included: what the process uses.
    pub in_use: u64,
    /// Bytes in free blocks the heap keeps (resident or not).
    pub free: u64,
}

/// The heap's use now; `None` on C libraries other than glibc. It walks
/// every arena under its lock, like [`trim`]: for benchmarks and
/// diagnostics, not for a hot path.
pub fn usage() -> Option<Usage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2(3) only reads the allocator's statistics and
        // returns them by value; it is thread-safe.
        let info = unsafe { libc::mallinfo2() };
        Some(Usage {
            in_use: (info.uordblks + info.hblkhd) as u64,
            free: info.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, from /proc (KiB).
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// One test, so nothing else allocates or frees in between.
    #[test]
    fn freed_small_allocations_are_counted_and_given_back() {
        let start = usage().expect("glibc");
        // Many small blocks (below glibc's mmap threshold, so they come from
        // the heap), written so their pages are resident; every other one
        // is kept, so the heap's top cannot shrink by itself and only a
        // trim returns the pages in between.
        let mut blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 4096]).collect();
        let held = usage().expect("glibc");
        assert!(
            held.in_use >= start.in_use + 4096 * 40_000,
            "{start:?} -> {held:?} holding 160 MB"
        );
        let kept: Vec<Vec<u8>> = blocks.iter_mut().step_by(64).map(std::mem::take).collect();
        drop(blocks);
        let freed = usage().expect("glibc");
        assert!(
            freed.free >= held.free + 4096 * 39_000,
            "{held:?} -> {freed:?} after freeing 156 MB"
        );
        let before = rss_kib();
        let released = trim();
        let after = rss_kib();
        assert!(
            released,
            "malloc_trim released nothing ({before} KiB resident)"
        );
        // About 160 MiB were freed; at least half must leave the RSS.
        assert!(
            before - after > 80 * 1024,
            "RSS {before} -> {after} KiB after the trim"
        );
        assert_eq!(kept.len(), 625);
    }
}
