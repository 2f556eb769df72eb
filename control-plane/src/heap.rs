//! Memory freed by a burst of agent streams, given back once it is over.
//!
//! ```text
//!  stream connected ─┐
//!  first update ACKed ├─▶ Churn::note ─▶ Burst (1 s quiet, at most 10 s) ─▶ malloc_trim on a blocking thread
//!  stream ended ─────┘
//! ```
//!
//! A reconnect storm of a thousand agents decodes a thousand Hellos of
//! 10,000 versions each and sends a thousand full states; all of it is
//! freed once the streams have synced, but glibc keeps the freed pages in
//! its arenas, so the control plane's RSS stayed near the storm's peak (a
//! quarter more per agent at 1,000 streams than the memory the streams
//! hold). One `malloc_trim` after the burst gives the pages back. The burst
//! is the sources' debounce ([`Burst`]): a steady trickle of reconnects
//! trims at most every [`TRIM_MAX_DELAY`], and a fleet that stays
//! connected never trims. Changes pushed to synced agents are not churn:
//! their parts are small and reused. Each trim is counted and timed
//! (`heap_trims`, `heap_trim_seconds`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::source::debounce::{Burst, Debounce};

/// Quiet after the last stream event before the heap is trimmed.
pub const TRIM_QUIET: Duration = Duration::from_secs(1);
/// Longest a continuous burst of stream events delays a trim.
pub const TRIM_MAX_DELAY: Duration = Duration::from_secs(10);

/// Where agent streams note that they connected, synced or ended.
#[derive(Debug, Default)]
pub struct Churn(Notify);

impl Churn {
    /// Records one stream event; a trim follows when the burst is over.
    pub fn note(&self) {
        // A permit is stored when the trimmer is busy, so no event is lost.
        self.0.notify_one();
    }
}

/// Trims the heap after each burst of `churn`, until `shutdown`.
pub async fn run(churn: Arc<Churn>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let window = Debounce {
        quiet: TRIM_QUIET,
        max_delay: TRIM_MAX_DELAY,
    };
    let mut burst = Burst::default();
    loop {
        tokio::select! {
            () = churn.0.notified() => burst.change(window, Instant::now()),
            () = burst.ended() => {
                burst.clear();
                let started = Instant::now();
                // It holds each arena's lock while it walks it: off the
                // runtime's threads.
                let released = tokio::task::spawn_blocking(switchyard_heap::trim)
                    .await
                    .unwrap_or(false);
                let took = started.elapsed();
                metrics.heap_trims.inc();
                metrics.heap_trim_seconds.observe(took.as_secs_f64());
                tracing::debug!(released, ?took, "trimmed the heap after a burst of agent streams");
            }
            () = shutdown.cancelled() => return,
        }
    }
}
