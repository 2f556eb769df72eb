//! The one debounce on the path from a source to the agents.
//!
//! ```text
//!  change ─▶ Burst::change ─▶ deadline = min(last change + quiet, first change + max_delay)
//!                                 │ more changes move it (never past the cap)
//!                                 ▼
//!                          Burst::ended ─▶ the source publishes ─▶ index builds at once
//! ```
//!
//! Sources that follow an origin event by event (`file`, `kube`, `docker`)
//! coalesce a burst here before they publish; the index then builds as
//! soon as a source publishes, coalescing only what arrives while it
//! builds, and a `switchyard:` source publishes each update at once (its
//! control plane already coalesced it). So a change waits for one quiet
//! window, however many sources and control planes it crosses.

use std::time::Duration;

use tokio::time::Instant;

/// How long a burst of changes is coalesced (`--debounce`, `--max-delay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Debounce {
    /// Quiet time that ends a burst.
    pub quiet: Duration,
    /// Longest a continuous burst may delay its publication, from its first change.
    pub max_delay: Duration,
}

impl Debounce {
    /// Coalesces nothing: every change is published at once (the default).
    pub const NONE: Self = Self {
        quiet: Duration::ZERO,
        max_delay: Duration::ZERO,
    };

    /// `quiet` of quiet, capped at four windows (tests and benches).
    pub fn quiet(quiet: Duration) -> Self {
        Self {
            quiet,
            max_delay: quiet * 4,
        }
    }
}

/// A burst of changes in progress, or none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    /// The burst's first change and when it ends.
    window: Option<(Instant, Instant)>,
}

impl Burst {
    /// Records a change at `now`: starts a burst, or moves its end.
    pub fn change(&mut self, debounce: Debounce, now: Instant) {
        let first = self.window.map_or(now, |(first, _)| first);
        let end = (now + debounce.quiet).min(first + debounce.max_delay);
        self.window = Some((first, end));
    }

    /// When the burst ends, if one is in progress.
    pub fn deadline(&self) -> Option<Instant> {
        self.window.map(|(_, end)| end)
    }

    /// Whether a burst is in progress.
    pub fn pending(&self) -> bool {
        self.window.is_some()
    }

    /// Forgets the burst (its changes were published).
    pub fn clear(&mut self) {
        self.window = None;
    }

    /// Completes when the burst ends; never without one (for `select!`).
    pub async fn ended(&self) {
        match self.deadline() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_ends_after_its_quiet_window_but_never_past_the_cap() {
        let d = Debounce {
            quiet: 100 * MS,
            max_delay: 250 * MS,
        };
        let t0 = Instant::now();
        let mut b = Burst::default();
        assert!(!b.pending());
        assert_eq!(b.deadline(), None);
        b.change(d, t0);
        assert_eq!(b.deadline(), Some(t0 + 100 * MS));
        b.change(d, t0 + 60 * MS);
        assert_eq!(b.deadline(), Some(t0 + 160 * MS));
        b.change(d, t0 + 200 * MS);
        assert_eq!(b.deadline(), Some(t0 + 250 * MS), "capped at max_delay");
        b.change(d, t0 + 300 * MS);
        assert_eq!(
            b.deadline(),
            Some(t0 + 250 * MS),
            "a change after the cap does not extend a burst that is due"
        );
        b.clear();
        assert!(!b.pending());
        b.change(d, t0 + 400 * MS);
        assert_eq!(b.deadline(), Some(t0 + 500 * MS), "a new burst");
    }

    #[test]
    fn no_debounce_is_due_at_once() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        b.change(Debounce::NONE, t0);
        assert_eq!(b.deadline(), Some(t0));
        assert_eq!(Debounce::quiet(10 * MS).max_delay, 40 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn ended_waits_for_the_deadline() {
        let d = Debounce::quiet(100 * MS);
        let mut b = Burst::default();
        let t0 = Instant::now();
        b.change(d, t0);
        b.ended().await;
        assert_eq!(Instant::now(), t0 + 100 * MS);
        b.clear();
        let never = tokio::time::timeout(Duration::from_secs(3600), b.ended()).await;
        assert!(never.is_err(), "no burst, no end");
    }
}
