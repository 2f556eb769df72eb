//! What an operator is told about the sources, from the states the index
//! reads: per-source metrics, and a WARN line once per cause.
//!
//! ```text
//!  index (each rebuild) ── SourceStatus ──▶ SourceSignals ──▶ metrics (synced, failing, errors, warnings)
//!                       ── skipped objects ──▶            └─▶ log: new causes only
//! ```
//!
//! The index rebuilds on every endpoint change, so a cause that is logged
//! on every rebuild (a missing `file:` path, a mistyped kind, an unknown
//! field, an invalid object) would repeat for as long as it lasts and
//! drown what changed. Each is logged when it first appears; one that
//! goes away and comes back is logged again.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::merge::ClustersetIssue;
use crate::metrics::{Metrics, source_labels};
use crate::source::ObjectError;
use crate::status::SourceStatus;

/// What was last seen of each source and each logged cause.
#[derive(Debug, Default)]
pub struct SourceSignals {
    /// Source name -> its current error.
    errors: HashMap<String, String>,
    /// Warnings (ignored input) present at the last look.
    warnings: Causes,
    /// Skipped objects present at the last look.
    skipped: Causes,
    /// Clusterset issues present at the last look.
    issues: Causes,
}

/// The causes present at the last look, to log only new ones.
#[derive(Debug, Default)]
struct Causes(HashSet<String>);

impl Causes {
    /// Replaces the set with `now`; returns the causes that were not in it.
    fn update<'a, T>(&mut self, now: &'a [T], key: impl Fn(&T) -> String) -> Vec<&'a T> {
        let mut next = HashSet::with_capacity(now.len());
        let mut new = Vec::new();
        for item in now {
            let k = key(item);
            if !self.0.contains(&k) {
                new.push(item);
            }
            next.insert(k);
        }
        self.0 = next;
        new
    }
}

fn object_key(e: &ObjectError) -> String {
    format!("{}\0{}\0{}\0{}", e.source, e.object, e.field, e.message)
}

impl SourceSignals {
    /// Sets the sources' metrics and logs their new errors and warnings.
    pub fn observe(&mut self, sources: &[SourceStatus], metrics: &Metrics) {
        for src in sources {
            let labels = source_labels(&src.name, &src.cluster);
            metrics
                .source_synced
                .get_or_create(&labels)
                .set(i64::from(src.synced));
            metrics
                .source_failing
                .get_or_create(&labels)
                .set(i64::from(src.last_error.is_some()));
            metrics
                .source_warnings
                .get_or_create(&labels)
                .set(src.warnings.len() as i64);
            // Registered at 0 from the start, so a query sees the series
            // before the first error.
            let errors = metrics.source_errors.get_or_create(&labels);
            let since = metrics
                .source_last_error_timestamp_seconds
                .get_or_create(&labels);
            match &src.last_error {
                Some(error) if self.errors.get(&src.name) != Some(error) => {
                    errors.inc();
                    since.set(
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64()),
                    );
                    tracing::warn!(source = %src.name, cluster = %src.cluster, synced = src.synced, "source failing: {error}");
                    self.errors.insert(src.name.clone(), error.clone());
                }
                Some(_) => {}
                None => {
                    if self.errors.remove(&src.name).is_some() {
                        tracing::info!(source = %src.name, cluster = %src.cluster, "source recovered");
                    }
                }
            }
        }
        let all: Vec<&ObjectError> = sources.iter().flat_map(|s| &s.warnings).collect();
        for w in self.warnings.update(&all, |w| object_key(w)) {
            tracing::warn!(source = %w.source, object = %w.object, field = %w.field, "ignored: {}", w.message);
        }
    }

    /// Logs the objects skipped as invalid that were not skipped before.
    pub fn skipped(&mut self, invalid: &[ObjectError]) {
        for e in self.skipped.update(invalid, object_key) {
            tracing::warn!(source = %e.source, object = %e.object, field = %e.field, "skipped: {}", e.message);
        }
    }

    /// Logs the clusterset issues that were not there before.
    pub fn clusterset_issues(&mut self, issues: &[ClustersetIssue]) {
        let key = |i: &ClustersetIssue| {
            format!("{}\0{}\0{}\0{}", i.service, i.cluster, i.reason, i.message)
        };
        for i in self.issues.update(issues, key) {
            tracing::warn!(service = %i.service, cluster = %i.cluster, reason = i.reason, "clusterset: {}", i.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(error: Option<&str>, warnings: usize) -> SourceStatus {
        SourceStatus {
            name: "file:/m".into(),
            cluster: "default".into(),
            synced: error.is_none(),
            last_error: error.map(str::to_owned),
            nodes: Vec::new().into(),
            warnings: (0..warnings)
                .map(|i| ObjectError {
                    source: "file:/m".into(),
                    object: format!("/m/a.yaml#{i}"),
                    field: "kind".into(),
                    message: "unknown kind".into(),
                })
                .collect(),
            dns: None,
        }
    }

    fn value(metrics: &Metrics, name: &str) -> String {
        let text = metrics.encode();
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("source=\"file:/m\""))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    }

    #[test]
    fn an_error_counts_once_per_cause_and_clears() {
        let metrics = Metrics::new();
        let mut signals = SourceSignals::default();
        signals.observe(&[source(None, 0)], &metrics);
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_synced{"),
            "1"
        );
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_failing{"),
            "0"
        );
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_errors_total{"),
            "0"
        );

        // The same error seen on three rebuilds is one error.
        for _ in 0..3 {
            signals.observe(&[source(Some("/m does not exist"), 0)], &metrics);
        }
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_failing{"),
            "1"
        );
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_synced{"),
            "0"
        );
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_errors_total{"),
            "1"
        );
        let at: f64 = value(
            &metrics,
            "switchyard_control_plane_source_last_error_timestamp_seconds{",
        )
        .parse()
        .expect("a number");
        assert!(at > 1.7e9, "a Unix time: {at}");

        // Another reason is another error; recovery clears the gauge only.
        signals.observe(&[source(Some("permission denied"), 0)], &metrics);
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_errors_total{"),
            "2"
        );
        signals.observe(&[source(None, 0)], &metrics);
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_failing{"),
            "0"
        );
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_errors_total{"),
            "2"
        );
    }

    #[test]
    fn only_new_causes_are_new() {
        let mut causes = Causes::default();
        assert_eq!(causes.update(&[1, 2], i32::to_string), [&1, &2]);
        assert!(causes.update(&[1, 2], i32::to_string).is_empty());
        assert_eq!(causes.update(&[2, 3], i32::to_string), [&3]);
        // Gone and back: new again.
        assert_eq!(causes.update(&[1, 2, 3], i32::to_string), [&1]);
        let metrics = Metrics::new();
        let mut signals = SourceSignals::default();
        signals.observe(&[source(None, 2)], &metrics);
        assert_eq!(
            value(&metrics, "switchyard_control_plane_source_warnings{"),
            "2"
        );
    }
}
