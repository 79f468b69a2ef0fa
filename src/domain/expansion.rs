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

#[cfg(test)]
mod tests {
    use super::*;

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
