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

/// What one of this node's CSIStorageCapacity objects says for a class, with what it was computed
/// from (the data root and its allocated bytes), to decide whether a new figure is worth a write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Published {
    /// The node's `kubernetes.io/hostname`, the object's topology.
    pub hostname: String,
    /// The uid of the owner (the agent's pod), once known.
    pub owner: Option<String>,
    /// The data root the class names.
    pub root: String,
    /// The class's `allowedTopologies` exclude this node (capacity zero).
    pub excluded: bool,
    /// The root's allocated bytes (the sum of its volumes' sizes).
    pub allocated: u64,
    /// The allocatable bytes published.
    pub capacity: u64,
}

/// Why an object is written again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishReason {
    /// Never written by this agent, or changed or deleted by someone else since.
    Missing,
    /// The class's root or topology, the node's hostname or the owner changed.
    Changed,
    /// A volume of the root was made, grown or removed: promises changed, so the figure is exact news.
    Volumes,
    /// Free space moved by at least the threshold.
    Moved,
    /// The figure reached zero or left it: the scheduler must know a node is full, or no longer is.
    Zero,
}

impl PublishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PublishReason::Missing => "missing",
            PublishReason::Changed => "changed",
            PublishReason::Volumes => "volumes",
            PublishReason::Moved => "moved",
            PublishReason::Zero => "zero",
        }
    }
}

/// Whether `next` is worth writing over `previous` (what this agent last wrote and still stands):
/// what the scheduler places by must be true, but free space drifting by less than `threshold` is
/// not news, or a pod writing steadily would have every agent rewrite its objects all the time.
pub fn publish_reason(
    previous: Option<&Published>,
    next: &Published,
    threshold: u64,
) -> Option<PublishReason> {
    let Some(previous) = previous else {
        return Some(PublishReason::Missing);
    };
    if previous.hostname != next.hostname
        || previous.owner != next.owner
        || previous.root != next.root
        || previous.excluded != next.excluded
    {
        return Some(PublishReason::Changed);
    }
    if previous.allocated != next.allocated {
        return Some(PublishReason::Volumes);
    }
    if previous.capacity == next.capacity {
        return None;
    }
    if previous.capacity.abs_diff(next.capacity) >= threshold.max(1) {
        return Some(PublishReason::Moved);
    }
    if previous.capacity == 0 || next.capacity == 0 {
        return Some(PublishReason::Zero);
    }
    None
}

#[cfg(test)]
mod publish_tests {
    use super::*;

    #[test]
    fn only_material_changes_are_written() {
        const MI: u64 = 1 << 20;
        let base = Published {
            hostname: "node-a".into(),
            owner: Some("uid-1".into()),
            root: "default".into(),
            excluded: false,
            allocated: 10 * MI,
            capacity: 1000 * MI,
        };
        let t = 64 * MI;
        let cases: &[(&str, Option<Published>, Option<PublishReason>)] = &[
            ("never written", None, Some(PublishReason::Missing)),
            ("the same figure", Some(base.clone()), None),
            (
                "drift under the threshold",
                Some(Published {
                    capacity: 1000 * MI + 63 * MI,
                    ..base.clone()
                }),
                None,
            ),
            (
                "a move of the threshold",
                Some(Published {
                    capacity: 1064 * MI,
                    ..base.clone()
                }),
                Some(PublishReason::Moved),
            ),
            (
                "a new volume, however small",
                Some(Published {
                    allocated: 9 * MI,
                    capacity: 1001 * MI,
                    ..base.clone()
                }),
                Some(PublishReason::Volumes),
            ),
            (
                "another root",
                Some(Published {
                    root: "fast".into(),
                    ..base.clone()
                }),
                Some(PublishReason::Changed),
            ),
            (
                "topology now excludes the node",
                Some(Published {
                    excluded: true,
                    capacity: 0,
                    ..base.clone()
                }),
                Some(PublishReason::Changed),
            ),
            (
                "a new owner",
                Some(Published {
                    owner: None,
                    ..base.clone()
                }),
                Some(PublishReason::Changed),
            ),
        ];
        for (what, previous, want) in cases {
            assert_eq!(publish_reason(previous.as_ref(), &base, t), *want, "{what}");
        }
        // Reaching zero, or leaving it, is news even when the move is small.
        let small = Published {
            capacity: 10 * MI,
            ..base.clone()
        };
        let full = Published {
            capacity: 0,
            ..base.clone()
        };
        assert_eq!(
            publish_reason(Some(&small), &full, t),
            Some(PublishReason::Zero)
        );
        assert_eq!(
            publish_reason(Some(&full), &small, t),
            Some(PublishReason::Zero)
        );
        // Successive small moves add up against what was written, not against the last figure seen.
        let mut written = base.clone();
        let mut writes = 0;
        for step in 1..=60u64 {
            let next = Published {
                capacity: base.capacity - step * 10 * MI,
                ..base.clone()
            };
            if publish_reason(Some(&written), &next, t).is_some() {
                written = next;
                writes += 1;
            }
        }
        assert_eq!(
            writes,
            600 / 70,
            "one write per 70 MiB (7 steps of 10 MiB) moved"
        );
    }
}
