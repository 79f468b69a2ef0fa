//! The capacity arithmetic used for admission (and reported by the node service).
//!
//!   limit       = cap, or (filesystem total - reserved) when no cap is set
//!   allocatable = min(filesystem available - reserved, limit - allocated), never below zero
//! where `allocated` is the sum of the capacities of this node's volumes. The first term keeps us honest
//! about the real disk today; the second keeps the promises made to earlier claims even before their
//! pods write, so two 4Ti claims are never placed on one 4Ti disk.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityInputs {
    pub filesystem_total: u64,
    pub filesystem_available: u64,
    pub reserved: u64,
    pub cap: Option<u64>,
    pub allocated: u64,
}

pub fn allocatable(inputs: &CapacityInputs) -> u64 {
    let by_disk = inputs.filesystem_available.saturating_sub(inputs.reserved);
    let limit = inputs
        .cap
        .unwrap_or_else(|| inputs.filesystem_total.saturating_sub(inputs.reserved));
    let by_promises = limit.saturating_sub(inputs.allocated);
    by_disk.min(by_promises)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tighter_of_disk_and_cap_wins() {
        let gi = 1u64 << 30;
        let disk = |total: u64, available: u64| CapacityInputs {
            filesystem_total: total,
            filesystem_available: available,
            ..Default::default()
        };
        let cases = [
            (disk(20 * gi, 10 * gi), 10 * gi),
            (
                CapacityInputs {
                    reserved: 2 * gi,
                    ..disk(20 * gi, 10 * gi)
                },
                8 * gi,
            ),
            // Promises count even when the volumes are still empty: no overcommit without an explicit cap.
            (
                CapacityInputs {
                    allocated: 15 * gi,
                    ..disk(20 * gi, 19 * gi)
                },
                5 * gi,
            ),
            (
                CapacityInputs {
                    allocated: 15 * gi,
                    reserved: 2 * gi,
                    ..disk(20 * gi, 19 * gi)
                },
                3 * gi,
            ),
            // An explicit cap above the disk allows thin provisioning, still bounded by free space.
            (
                CapacityInputs {
                    cap: Some(100 * gi),
                    allocated: 50 * gi,
                    ..disk(20 * gi, 19 * gi)
                },
                19 * gi,
            ),
            (
                CapacityInputs {
                    filesystem_available: 10 * gi,
                    cap: Some(3 * gi),
                    allocated: gi,
                    ..Default::default()
                },
                2 * gi,
            ),
            (
                CapacityInputs {
                    filesystem_available: gi,
                    cap: Some(3 * gi),
                    allocated: 0,
                    ..Default::default()
                },
                gi,
            ),
            (
                CapacityInputs {
                    filesystem_available: gi,
                    reserved: 2 * gi,
                    ..Default::default()
                },
                0,
            ),
            (
                CapacityInputs {
                    filesystem_available: 10 * gi,
                    cap: Some(3 * gi),
                    allocated: 5 * gi,
                    ..Default::default()
                },
                0,
            ),
        ];
        for (inputs, want) in cases {
            assert_eq!(allocatable(&inputs), want, "{inputs:?}");
        }
    }
}

/// The figures whose change is worth telling subscribers and the scheduler about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub volume_count: u32,
    pub allocated: u64,
    pub allocatable: u64,
    pub available: u64,
}

/// A change in volumes or promises always counts; free space must move by at least `threshold` bytes,
/// so a pod writing steadily does not flood watchers and the API server.
pub fn materially_changed(previous: &Snapshot, next: &Snapshot, threshold: u64) -> bool {
    previous.volume_count != next.volume_count
        || previous.allocated != next.allocated
        || previous.allocatable.abs_diff(next.allocatable) >= threshold.max(1)
        || previous.available.abs_diff(next.available) >= threshold.max(1)
}

#[cfg(test)]
mod change_tests {
    use super::*;

    #[test]
    fn small_drift_is_not_news_but_volumes_are() {
        let base = Snapshot {
            volume_count: 1,
            allocated: 10,
            allocatable: 1000,
            available: 5000,
        };
        assert!(!materially_changed(&base, &base, 100));
        assert!(!materially_changed(
            &base,
            &Snapshot {
                available: 5050,
                allocatable: 990,
                ..base
            },
            100
        ));
        assert!(materially_changed(
            &base,
            &Snapshot {
                available: 4800,
                ..base
            },
            100
        ));
        assert!(materially_changed(
            &base,
            &Snapshot {
                allocatable: 800,
                ..base
            },
            100
        ));
        assert!(materially_changed(
            &base,
            &Snapshot {
                volume_count: 2,
                ..base
            },
            100
        ));
        assert!(materially_changed(
            &base,
            &Snapshot {
                allocated: 11,
                ..base
            },
            100
        ));
    }
}
