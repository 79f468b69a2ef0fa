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

/// Labels of one volume, as people filter on them (same names as the kubelet's volume stats).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    pub persistentvolumeclaim: String,
    pub persistentvolume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// failures | recent_volumes | recent_growth | directory_edits | events
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// The supervised task's name (README, "Staying up").
    pub task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpansionLabels {
    /// succeeded | refused | failed
    pub outcome: &'static str,
}

/// Labels of one data root's size enforcement.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub root: String,
    /// btrfs-qgroup | xfs-project | ext4-project | none | unavailable
    pub mechanism: String,
    /// auto | required | off
    pub mode: String,
}

/// One volume's figures for the per-volume gauges.
#[derive(Debug, Clone)]
pub struct VolumeFigures {
    pub labels: VolumeLabels,
    pub capacity_bytes: u64,
    pub used_bytes: Option<u64>,
    pub used_inodes: Option<u64>,
}

pub struct Metrics {
    registry: Registry,
    volume_capacity_bytes: Family<VolumeLabels, Gauge>,
    volume_used_bytes: Family<VolumeLabels, Gauge>,
    volume_available_bytes: Family<VolumeLabels, Gauge>,
    volume_inodes_used: Family<VolumeLabels, Gauge>,
    quota_enforced: Family<QuotaLabels, Gauge>,
    expansions: Family<ExpansionLabels, Counter>,
    object_state_entries: Family<StateLabels, Gauge>,
    provisions: Family<OutcomeLabels, Counter>,
    provision_duration: Histogram,
    reclaims: Family<OutcomeLabels, Counter>,
    reconcile_errors: Counter,
    task_restarts: Family<TaskLabels, Counter>,
    reconcile_panics: Counter,
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
        let reclaims = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "reclaims",
            "Released volumes whose directory this agent removed, archived or kept, by outcome",
            reclaims.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Transient errors that caused a retry with backoff",
            reconcile_errors.clone(),
        );
        let task_restarts = Family::<TaskLabels, Counter>::default();
        registry.register(
            "task_restarts",
            "Background tasks that ended or panicked and were restarted, by task",
            task_restarts.clone(),
        );
        let reconcile_panics = Counter::default();
        registry.register(
            "reconcile_panics",
            "Reconciles of one object that panicked (an error for that object, retried with backoff)",
            reconcile_panics.clone(),
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
        let volume = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<VolumeLabels, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        let volume_capacity_bytes = volume(
            &mut registry,
            "volume_capacity_bytes",
            "Size of each volume of this node (its claim's request; the hard limit where quotas enforce it)",
        );
        let volume_used_bytes = volume(
            &mut registry,
            "volume_used_bytes",
            "Bytes used by each volume (from the quota accounting where there is one, else a directory walk)",
        );
        let volume_available_bytes = volume(
            &mut registry,
            "volume_available_bytes",
            "Bytes each volume may still take before reaching its size",
        );
        let volume_inodes_used = volume(
            &mut registry,
            "volume_inodes_used",
            "Files and directories in each volume, where known",
        );
        let quota_enforced = Family::<QuotaLabels, Gauge>::default();
        registry.register(
            "quota_enforced",
            "1 when a data root enforces volume sizes with filesystem quotas, else 0",
            quota_enforced.clone(),
        );
        let expansions = Family::<ExpansionLabels, Counter>::default();
        registry.register(
            "expansions",
            "Volume expansions handled by this agent, by outcome",
            expansions.clone(),
        );
        let object_state_entries = Family::<StateLabels, Gauge>::default();
        registry.register(
            "object_state_entries",
            "Per-claim and per-PV entries the agent holds besides its watch caches, by map (all 0 once \
             its claims and PVs are gone)",
            object_state_entries.clone(),
        );
        Self {
            registry,
            expansions,
            object_state_entries,
            volume_capacity_bytes,
            volume_used_bytes,
            volume_available_bytes,
            volume_inodes_used,
            quota_enforced,
            provisions,
            provision_duration,
            reclaims,
            reconcile_errors,
            task_restarts,
            reconcile_panics,
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

    /// A released volume's reclaim failed and will be retried: not a provisioning failure.
    pub fn task_restarted(&self, task: &'static str) {
        self.task_restarts.get_or_create(&TaskLabels { task }).inc();
    }

    /// Restarts of `task` so far (for tests).
    pub fn task_restarts(&self, task: &'static str) -> u64 {
        self.task_restarts.get_or_create(&TaskLabels { task }).get()
    }

    pub fn reconcile_panicked(&self) {
        self.reconcile_panics.inc();
        self.reconcile_errors.inc();
    }

    pub fn reclaim_failed(&self, reason: &'static str) {
        self.reclaims
            .get_or_create(&OutcomeLabels {
                outcome: "failed",
                reason,
            })
            .inc();
        self.reconcile_errors.inc();
    }

    /// Replaces the per-volume gauges with `volumes`: a volume that is gone leaves no label set behind.
    pub fn set_volumes(&self, volumes: &[VolumeFigures]) {
        for family in [
            &self.volume_capacity_bytes,
            &self.volume_used_bytes,
            &self.volume_available_bytes,
            &self.volume_inodes_used,
        ] {
            family.clear();
        }
        for v in volumes {
            let gauge = |bytes: u64| bytes.min(i64::MAX as u64) as i64;
            self.volume_capacity_bytes
                .get_or_create(&v.labels)
                .set(gauge(v.capacity_bytes));
            if let Some(used) = v.used_bytes {
                self.volume_used_bytes
                    .get_or_create(&v.labels)
                    .set(gauge(used));
                self.volume_available_bytes
                    .get_or_create(&v.labels)
                    .set(gauge(v.capacity_bytes.saturating_sub(used)));
            }
            if let Some(inodes) = v.used_inodes {
                self.volume_inodes_used
                    .get_or_create(&v.labels)
                    .set(gauge(inodes));
            }
        }
    }

    pub fn set_state_entries(&self, entries: &[(&'static str, usize)]) {
        for (map, n) in entries {
            self.object_state_entries
                .get_or_create(&StateLabels { map })
                .set(*n as i64);
        }
    }

    pub fn expansion(&self, outcome: &'static str) {
        self.expansions
            .get_or_create(&ExpansionLabels { outcome })
            .inc();
    }

    /// Replaces the per-root enforcement gauges.
    pub fn set_quotas(&self, roots: &[(QuotaLabels, bool)]) {
        self.quota_enforced.clear();
        for (labels, enforced) in roots {
            self.quota_enforced
                .get_or_create(labels)
                .set(i64::from(*enforced));
        }
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
        m.reclaim_failed("mount_point");
        let text = m.render();
        assert!(
            text.contains("hostvol_reclaims_total{outcome=\"failed\",reason=\"mount_point\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("hostvol_provisions_total{outcome=\"failed\""),
            "a reclaim failure is not a provisioning failure: {text}"
        );
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

    #[test]
    fn volume_gauges_follow_the_volumes() {
        let m = Metrics::default();
        let labels = |pv: &str| VolumeLabels {
            namespace: "ns".into(),
            persistentvolumeclaim: format!("claim-{pv}"),
            persistentvolume: pv.into(),
        };
        m.set_volumes(&[
            VolumeFigures {
                labels: labels("pvc-1"),
                capacity_bytes: 100,
                used_bytes: Some(91),
                used_inodes: None,
            },
            VolumeFigures {
                labels: labels("pvc-2"),
                capacity_bytes: 100,
                used_bytes: None,
                used_inodes: None,
            },
        ]);
        let text = m.render();
        let line = "hostvol_volume_available_bytes{namespace=\"ns\",persistentvolumeclaim=\"claim-pvc-1\",persistentvolume=\"pvc-1\"} 9";
        assert!(text.contains(line), "{text}");
        assert!(text.contains("persistentvolume=\"pvc-2\"} 100"), "{text}");
        m.set_volumes(&[]);
        assert!(
            !m.render().contains("pvc-1"),
            "a removed volume's gauges must go"
        );
    }
}
