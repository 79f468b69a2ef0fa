//! Choosing a node for a claim of an Immediate StorageClass, which no scheduler places.
//!
//! Every agent runs the same choice over the same published capacities, so they agree on one node
//! without talking to each other; only the chosen node's agent claims the volume, with an
//! optimistic-concurrency update of the claim, so even agents with different views cannot both win.
//!
//! A class's `allowedTopologies` limits the nodes: each agent checks its own node's labels against the
//! class's terms and publishes, on its capacity for that class, whether the node is allowed
//! (`ANN_EXCLUDED`, with zero capacity); the choice is then made among allowed nodes only.

use std::collections::BTreeMap;

/// On a published CSIStorageCapacity: the class's `allowedTopologies` exclude this node (its
/// capacity for the class is then zero). Absent means allowed.
pub const ANN_EXCLUDED: &str = "hostvol.io/excluded-by-topology";

/// One requirement of a topology term: the node's label `key` has one of `values`. A StorageClass's
/// `TopologySelectorLabelRequirement` has no operator: it always means `In`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub values: Vec<String>,
}

/// A term: every requirement must hold.
pub type Term = Vec<Requirement>;

/// Whether a node with `labels` may hold volumes of a class with these `allowedTopologies` terms, as
/// the scheduler decides for WaitForFirstConsumer classes (`MatchTopologySelectorTerms`): no terms
/// allow every node; otherwise one term must match, and a term matches when each of its requirements
/// names the node's value of its key. An empty term, or a requirement without values, matches nothing.
pub fn allowed(terms: &[Term], labels: &BTreeMap<String, String>) -> bool {
    terms.is_empty()
        || terms.iter().any(|term| {
            !term.is_empty()
                && term.iter().all(|r| {
                    labels
                        .get(&r.key)
                        .is_some_and(|value| r.values.iter().any(|v| v == value))
                })
        })
}

/// The terms for people: `kubernetes.io/hostname in (node-b) and zone in (z1), or ...`.
pub fn describe(terms: &[Term]) -> String {
    if terms.is_empty() {
        return "any node".to_string();
    }
    terms
        .iter()
        .map(|term| {
            if term.is_empty() {
                return "(an empty term, which matches no node)".to_string();
            }
            term.iter()
                .map(|r| format!("{} in ({})", r.key, r.values.join(", ")))
                .collect::<Vec<_>>()
                .join(" and ")
        })
        .collect::<Vec<_>>()
        .join(", or ")
}

/// Why no node can take a claim of a class restricted by `terms`: none of the nodes with an agent is
/// allowed, or none of the allowed ones has room (`best`: the most room among them, and where).
pub fn topology_refusal(
    class: &str,
    terms: &[Term],
    request: &str,
    best: Option<(&str, &str)>,
) -> String {
    let allowed = describe(terms);
    match best {
        None => format!(
            "no node with a hostvol agent matches the allowedTopologies of StorageClass {class} \
             ({allowed}); label a node to match, or use a class whose allowedTopologies name nodes \
             that run the agent"
        ),
        Some((node, room)) => format!(
            "no node allowed by the allowedTopologies of StorageClass {class} ({allowed}) can hold \
             {request}: the most room among them is {room} on node {node}; free space there, allow \
             more nodes, or request less (retried when capacity changes)"
        ),
    }
}

/// One node's standing, as all agents can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    /// Allocatable bytes the node published for the claim's class.
    pub allocatable: u64,
    /// Bytes of claims already placed on the node but not yet provisioned (not in `allocatable` yet).
    pub pending: u64,
    /// Whether the class's `allowedTopologies` allow the node (as the node's agent published).
    pub allowed: bool,
}

impl Candidate {
    pub fn room(&self) -> u64 {
        self.allocatable.saturating_sub(self.pending)
    }
}

/// The allowed node with the most room that fits `request`; ties go to the smallest node name so
/// that every agent picks the same one.
pub fn choose(request: u64, candidates: &[Candidate]) -> Option<&Candidate> {
    most_room(
        candidates
            .iter()
            .filter(|c| c.allowed && c.room() >= request),
    )
}

/// The allowed node with the most room, fitting or not (what a refusal names).
pub fn best_allowed(candidates: &[Candidate]) -> Option<&Candidate> {
    most_room(candidates.iter().filter(|c| c.allowed))
}

/// The node that speaks for the group when no node fits (so one Warning is emitted, not one per
/// node): any node with an agent, allowed or not, so that someone speaks when none is allowed.
pub fn spokesperson(candidates: &[Candidate]) -> Option<&Candidate> {
    most_room(candidates.iter())
}

fn most_room<'c>(candidates: impl Iterator<Item = &'c Candidate>) -> Option<&'c Candidate> {
    candidates.max_by(|a, b| a.room().cmp(&b.room()).then_with(|| b.node.cmp(&a.node)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, allocatable: u64, pending: u64) -> Candidate {
        Candidate {
            node: node.into(),
            allocatable,
            pending,
            allowed: true,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn topology_terms_match_as_the_scheduler_does() {
        const HOST: &str = "kubernetes.io/hostname";
        const ZONE: &str = "topology.kubernetes.io/zone";
        let a = labels(&[(HOST, "node-a"), (ZONE, "z1")]);
        let b = labels(&[(HOST, "node-b"), (ZONE, "z2")]);
        let bare = labels(&[(HOST, "node-c")]);
        let cases: &[(&str, Vec<Term>, [bool; 3])] = &[
            ("no terms allow every node", vec![], [true, true, true]),
            (
                "one key",
                vec![vec![req(HOST, &["node-b"])]],
                [false, true, false],
            ),
            (
                "several values",
                vec![vec![req(HOST, &["node-a", "node-b"])]],
                [true, true, false],
            ),
            (
                "two keys in one term: both must match",
                vec![vec![req(HOST, &["node-a", "node-b"]), req(ZONE, &["z2"])]],
                [false, true, false],
            ),
            (
                "a missing label does not match",
                vec![vec![req(ZONE, &["z1", "z2"])]],
                [true, true, false],
            ),
            (
                "terms are alternatives",
                vec![vec![req(ZONE, &["z1"])], vec![req(HOST, &["node-c"])]],
                [true, false, true],
            ),
            (
                "an empty term matches nothing",
                vec![vec![]],
                [false, false, false],
            ),
            (
                "a requirement without values matches nothing",
                vec![vec![req(HOST, &[])]],
                [false, false, false],
            ),
        ];
        for (what, terms, want) in cases {
            let got = [&a, &b, &bare].map(|l| allowed(terms, l));
            assert_eq!(&got, want, "{what}");
        }
    }

    #[test]
    fn refusals_name_the_terms() {
        let terms = vec![vec![
            req("kubernetes.io/hostname", &["node-b"]),
            req("zone", &["z1", "z2"]),
        ]];
        assert_eq!(
            describe(&terms),
            "kubernetes.io/hostname in (node-b) and zone in (z1, z2)"
        );
        let none = topology_refusal("local", &terms, "1Gi", None);
        assert!(
            none.contains("StorageClass local")
                && none.contains("kubernetes.io/hostname in (node-b) and zone in (z1, z2)"),
            "{none}"
        );
        let full = topology_refusal("local", &terms, "1Gi", Some(("node-b", "10Mi")));
        assert!(
            full.contains("1Gi")
                && full.contains("10Mi on node node-b")
                && full.contains("zone in"),
            "{full}"
        );
    }

    #[test]
    fn only_allowed_nodes_are_chosen_but_anyone_may_speak() {
        let excluded = |node: &str, allocatable| Candidate {
            allowed: false,
            ..c(node, allocatable, 0)
        };
        let nodes = [excluded("a", 100), c("b", 10, 0)];
        assert_eq!(
            choose(5, &nodes).unwrap().node,
            "b",
            "a has more room but is excluded"
        );
        assert!(choose(11, &nodes).is_none());
        assert_eq!(best_allowed(&nodes).unwrap().node, "b");
        let nobody = [excluded("a", 0), excluded("b", 0)];
        assert!(choose(0, &nobody).is_none() && best_allowed(&nobody).is_none());
        assert_eq!(spokesperson(&nobody).unwrap().node, "a");
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
