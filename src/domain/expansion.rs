//! Online expansion: whether a bound volume may grow to its claim's new request, with the same
//! arithmetic as admission (the extra bytes must fit in what the node can still hand out).

use crate::domain::quantity::format_bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expansion {
    /// The volume is already at least as large as requested (shrinking is not a thing).
    NotNeeded,
    /// Grow by `extra` bytes to `to` bytes.
    Grow { to: u64, extra: u64 },
    /// The node cannot hold the extra bytes; the message says how much room there is.
    NoRoom(String),
}

/// `current` is the volume's size now, `requested` the claim's new request, `allocatable` what the
/// volume's data root can still hand out on `node`.
pub fn decide(current: u64, requested: u64, allocatable: u64, node: &str) -> Expansion {
    if requested <= current {
        return Expansion::NotNeeded;
    }
    let extra = requested - current;
    if extra > allocatable {
        return Expansion::NoRoom(format!(
            "growing from {} to {} needs {} more on node {node}, which has {} left; \
             free space or raise the node's cap, or request less",
            format_bytes(current),
            format_bytes(requested),
            format_bytes(extra),
            format_bytes(allocatable)
        ));
    }
    Expansion::Grow {
        to: requested,
        extra,
    }
}

/// `allocatedResourceStatuses["storage"]` while a resize is under way (or failed and will be retried),
/// as external resizers write it (1.32+ servers keep the field; older ones drop it on write).
pub const RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
/// ... and when it cannot be done as asked: the user may lower the request again (1.32+), down to
/// `status.capacity`, to recover.
pub const RESIZE_INFEASIBLE: &str = "ControllerResizeInfeasible";

/// What a claim's status says of its size and of a resize.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimStatus {
    /// `status.capacity.storage`, 0 when absent.
    pub capacity: u64,
    /// `status.allocatedResources.storage` (1.23+ with RecoverVolumeExpansionFailure, on by default from 1.32).
    pub allocated: Option<u64>,
    /// `status.allocatedResourceStatuses.storage` (same versions).
    pub resize_status: Option<String>,
    /// `status.phase` is not `Bound` yet: the PV controller is still binding the claim and writes its
    /// status itself (phase and capacity, guarded by resourceVersion).
    pub binding: bool,
}

/// Once the volume is at least `requested` bytes: whether the claim's status still has to be brought
/// level with it. True when it shows less than the request, and also when an earlier resize left its
/// marks (a resize status, or an allocated size other than the request): that is the recovery from a
/// failed expansion on 1.32+, where the user lowered the request to what the node can hold (or back to
/// the volume's size) and the claim must stop showing the failed size.
/// A claim still being bound is left to the PV controller: writing its status then would only make the
/// controller's own status write conflict and retry, while the kubelet refuses the pod's volume until
/// the phase says Bound.
pub fn status_behind(requested: u64, status: &ClaimStatus) -> bool {
    if status.binding {
        return false;
    }
    status.capacity < requested
        || status.resize_status.is_some()
        || status
            .allocated
            .is_some_and(|allocated| allocated != requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_levelled_after_growth_and_after_recovery() {
        let gi = 1u64 << 30;
        let settled = |size| ClaimStatus {
            capacity: size,
            allocated: Some(size),
            resize_status: None,
            binding: false,
        };
        let cases = [
            // Just provisioned: volumeName set, the PV controller has not written the status yet.
            (
                "being bound",
                10 * gi,
                ClaimStatus {
                    binding: true,
                    ..Default::default()
                },
                false,
            ),
            // 1.20: no allocatedResources / allocatedResourceStatuses at all.
            (
                "1.20, grown",
                20 * gi,
                ClaimStatus {
                    capacity: 10 * gi,
                    ..Default::default()
                },
                true,
            ),
            (
                "1.20, level",
                10 * gi,
                ClaimStatus {
                    capacity: 10 * gi,
                    ..Default::default()
                },
                false,
            ),
            // 1.32+: a settled claim is left alone (no write loop).
            ("1.32, level", 10 * gi, settled(10 * gi), false),
            (
                "1.32, mid-resize",
                20 * gi,
                ClaimStatus {
                    capacity: 10 * gi,
                    allocated: Some(20 * gi),
                    resize_status: Some(RESIZE_IN_PROGRESS.into()),
                    binding: false,
                },
                true,
            ),
            // 100Gi was infeasible; the user lowered the request back to the volume's 10Gi.
            (
                "1.32, recovered to the old size",
                10 * gi,
                ClaimStatus {
                    capacity: 10 * gi,
                    allocated: None,
                    resize_status: Some(RESIZE_INFEASIBLE.into()),
                    binding: false,
                },
                true,
            ),
            // 100Gi failed after the claim was marked; lowered to 15Gi, which the volume now has.
            (
                "1.32, recovered to a smaller growth",
                15 * gi,
                ClaimStatus {
                    capacity: 15 * gi,
                    allocated: Some(100 * gi),
                    resize_status: Some(RESIZE_IN_PROGRESS.into()),
                    binding: false,
                },
                true,
            ),
        ];
        for (case, requested, status, want) in cases {
            assert_eq!(status_behind(requested, &status), want, "{case}");
        }
    }

    #[test]
    fn grows_only_within_the_room_left() {
        let mi = 1u64 << 20;
        let cases = [
            (10 * mi, 10 * mi, 0, Expansion::NotNeeded),
            (10 * mi, 5 * mi, 100 * mi, Expansion::NotNeeded),
            (
                10 * mi,
                30 * mi,
                20 * mi,
                Expansion::Grow {
                    to: 30 * mi,
                    extra: 20 * mi,
                },
            ),
            (
                10 * mi,
                30 * mi,
                100 * mi,
                Expansion::Grow {
                    to: 30 * mi,
                    extra: 20 * mi,
                },
            ),
        ];
        for (current, requested, room, want) in cases {
            assert_eq!(decide(current, requested, room, "n"), want);
        }
        let Expansion::NoRoom(why) = decide(10 * mi, 30 * mi, 19 * mi, "node-a") else {
            panic!("20Mi more cannot fit in 19Mi");
        };
        assert!(why.contains("node-a") && why.contains("19"), "{why}");
    }
}
