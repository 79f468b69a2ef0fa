//! Choosing a node for a claim of an Immediate StorageClass, which no scheduler places.
//!
//! Every agent runs the same choice over the same published capacities, so they agree on one node
//! without talking to each other; only the chosen node's agent claims the volume, with an
//! optimistic-concurrency update of the claim, so even agents with different views cannot both win.

/// One node's standing, as all agents can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    /// Allocatable bytes the node published for the claim's class.
    pub allocatable: u64,
    /// Bytes of claims already placed on the node but not yet provisioned (not in `allocatable` yet).
    pub pending: u64,
}

impl Candidate {
    pub fn room(&self) -> u64 {
        self.allocatable.saturating_sub(self.pending)
    }
}

/// The node with the most room that fits `request`; ties go to the smallest node name so that every
/// agent picks the same one.
pub fn choose(request: u64, candidates: &[Candidate]) -> Option<&Candidate> {
    candidates
        .iter()
        .filter(|c| c.room() >= request)
        .max_by(|a, b| a.room().cmp(&b.room()).then_with(|| b.node.cmp(&a.node)))
}

/// The node that speaks for the group when no node fits (so one Warning is emitted, not one per node).
pub fn spokesperson(candidates: &[Candidate]) -> Option<&Candidate> {
    choose(0, candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, allocatable: u64, pending: u64) -> Candidate {
        Candidate {
            node: node.into(),
            allocatable,
            pending,
        }
    }

    #[test]
    fn most_room_wins_and_ties_are_stable() {
        let nodes = [c("a", 10, 0), c("b", 30, 0), c("c", 30, 0)];
        assert_eq!(choose(5, &nodes).unwrap().node, "b");
        let nodes = [c("a", 10, 0), c("b", 30, 25), c("c", 20, 0)];
        assert_eq!(
            choose(5, &nodes).unwrap().node,
            "c",
            "pending claims count against a node"
        );
    }

    #[test]
    fn nothing_fits_means_no_choice_but_a_spokesperson() {
        let nodes = [c("a", 10, 0), c("b", 8, 0)];
        assert!(choose(11, &nodes).is_none());
        assert_eq!(spokesperson(&nodes).unwrap().node, "a");
        assert!(spokesperson(&[]).is_none());
    }

    #[test]
    fn successive_choices_spread_by_capacity() {
        // Simulate agents placing 30 x 1-unit claims one after another on three nodes.
        let mut nodes = vec![c("a", 10, 0), c("b", 20, 0), c("c", 30, 0)];
        for _ in 0..30 {
            let chosen = choose(1, &nodes).unwrap().node.clone();
            nodes.iter_mut().find(|n| n.node == chosen).unwrap().pending += 1;
        }
        let counts: Vec<u64> = nodes.iter().map(|n| n.pending).collect();
        assert_eq!(counts.iter().sum::<u64>(), 30);
        assert!(counts[2] > counts[1] && counts[1] > counts[0], "{counts:?}");
    }
}
