//! Prometheus metrics, served as text on /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// succeeded | refused | failed
    pub outcome: &'static str,
    /// Why, for refused and failed (empty on success).
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    provisions: Family<OutcomeLabels, Counter>,
    provision_duration: Histogram,
    reconcile_errors: Counter,
    pub allocatable_bytes: Gauge,
    /// Optimistic-concurrency conflicts while placing claims on this node.
    pub placement_conflicts: Counter,
    /// Claims this agent placed on its own node (Immediate classes, pods with spec.nodeName).
    pub placements: Counter,
    pub orphan_directories: Gauge,
    pub lost_volumes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hostvol");
        let provisions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "provisions",
            "Claims handled by this agent, by outcome",
            provisions.clone(),
        );
        // 1 ms .. ~16 s
        let provision_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "provision_duration_seconds",
            "Time from picking up a claim to its PV existing (successful provisions)",
            provision_duration.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Transient errors that caused a retry with backoff",
            reconcile_errors.clone(),
        );
        let allocatable_bytes = Gauge::default();
        registry.register(
            "allocatable_bytes",
            "Bytes this node would still accept for new claims",
            allocatable_bytes.clone(),
        );
        let placement_conflicts = Counter::default();
        registry.register(
            "placement_conflicts",
            "Conflicts while placing a claim on this node (another writer was first)",
            placement_conflicts.clone(),
        );
        let placements = Counter::default();
        registry.register(
            "placements",
            "Claims this agent placed on its own node",
            placements.clone(),
        );
        let orphan_directories = Gauge::default();
        registry.register(
            "orphan_directories",
            "Directories in the data root that no PV points at (archived ones included)",
            orphan_directories.clone(),
        );
        let lost_volumes = Gauge::default();
        registry.register(
            "lost_volumes",
            "PVs of this node whose directory is missing",
            lost_volumes.clone(),
        );
        Self {
            registry,
            provisions,
            provision_duration,
            reconcile_errors,
            allocatable_bytes,
            placement_conflicts,
            placements,
            orphan_directories,
            lost_volumes,
        }
    }
}

impl Metrics {
    pub fn provision_succeeded(&self, seconds: f64) {
        self.provisions
            .get_or_create(&OutcomeLabels {
                outcome: "succeeded",
                reason: "",
            })
            .inc();
        self.provision_duration.observe(seconds);
    }

    pub fn provision_refused(&self, reason: &'static str) {
        self.provisions
            .get_or_create(&OutcomeLabels {
                outcome: "refused",
                reason,
            })
            .inc();
    }

    pub fn provision_failed(&self, reason: &'static str) {
        self.provisions
            .get_or_create(&OutcomeLabels {
                outcome: "failed",
                reason,
            })
            .inc();
        self.reconcile_errors.inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histogram() {
        let m = Metrics::default();
        m.provision_succeeded(0.004);
        m.provision_refused("block_volume_mode");
        let text = m.render();
        assert!(
            text.contains("hostvol_provisions_total{outcome=\"succeeded\",reason=\"\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "hostvol_provisions_total{outcome=\"refused\",reason=\"block_volume_mode\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("hostvol_provision_duration_seconds_count 1"),
            "{text}"
        );
    }
}
