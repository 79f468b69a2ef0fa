//! Getting retained data back: may a Released volume's data go to a new claim, and why not.
//! Plain facts in, one refusal out (the CLI prints it, the agent checks it again before acting).

use std::fmt;

use crate::domain::quantity;

/// Set on a Released PV by `hostvol reuse` (a PV patch, so RBAC decides who may): the claim its data
/// goes to, as `<namespace>/<claim>/<claim uid>`. The uid keeps a re-created claim of the same name
/// from getting data meant for the one that was asked for.
pub const ANN_REUSE_FOR: &str = "hostvol.io/reuse-for";
/// On the new PV: the PV whose directory it takes over (the old PV is deleted last).
pub const ANN_REUSED_FROM: &str = "hostvol.io/reused-from";

/// The claim a reuse is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Target {
    pub fn parse(record: &str) -> Option<Target> {
        let mut parts = record.trim().splitn(3, '/');
        let (namespace, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
        let ok = |s: &str| !s.is_empty() && !s.contains('/');
        (ok(namespace) && ok(name) && ok(uid)).then(|| Target {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
        })
    }

    pub fn record(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.name, self.uid)
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the decision needs of the retained volume.
#[derive(Debug, Clone, Default)]
pub struct Volume {
    pub name: String,
    /// Provisioned by this hostvol (the `pv.kubernetes.io/provisioned-by` annotation).
    pub ours: bool,
    pub phase: String,
    /// `namespace/name` of the claim it is (or was) bound to.
    pub claim: String,
    /// The data's size: the PV's capacity, which is also its limit where the root enforces sizes.
    pub capacity_bytes: u64,
    /// The node serving the data, or empty when only that node's agent can tell (a volume pinned by
    /// a `nodeAffinityKey` label is served by whichever node carries the value).
    pub node: String,
    pub purge_requested: bool,
    /// A reuse already asked for (`ANN_REUSE_FOR`), if any.
    pub reuse_for: Option<Target>,
}

/// What the decision needs of the claim that is to get the data.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub deleting: bool,
    /// `spec.volumeName`, when the claim is bound (or being bound) to a volume already.
    pub volume_name: Option<String>,
    /// Why hostvol could not serve this claim at all (block mode, RWX, selector, no size), if so.
    pub unservable: Option<String>,
    /// The claim asks to be filled from a data source (a clone): not a reuse.
    pub has_data_source: bool,
    pub requested_bytes: u64,
    pub class: String,
    /// The claim's StorageClass exists and is served by this hostvol.
    pub class_ours: bool,
    /// `volume.kubernetes.io/selected-node`: where the scheduler (or an agent) placed the claim.
    pub selected_node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotHostvol {
        pv: String,
    },
    InUse {
        pv: String,
        claim: String,
    },
    NotReleased {
        pv: String,
        phase: String,
    },
    PurgeRequested {
        pv: String,
    },
    ReuseForAnother {
        pv: String,
        other: String,
    },
    ClaimDeleting {
        claim: String,
    },
    ClaimBound {
        claim: String,
        volume: String,
    },
    ClaimUnservable {
        claim: String,
        why: String,
    },
    ClaimClones {
        claim: String,
    },
    ClassNotOurs {
        claim: String,
        class: String,
    },
    TooSmall {
        claim: String,
        asks: u64,
        limit: u64,
    },
    TooLarge {
        claim: String,
        asks: u64,
        limit: u64,
    },
    OtherNode {
        claim: String,
        selected: String,
        node: String,
    },
    /// An orphaned directory holds more than the claim asks for.
    DataLarger {
        claim: String,
        asks: u64,
        used: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = |b: &u64| quantity::format_bytes(*b);
        match self {
            Refusal::NotHostvol { pv } => {
                write!(f, "{pv} was not provisioned by hostvol; nothing done")
            }
            Refusal::InUse { pv, claim } => write!(
                f,
                "{pv} is Bound to claim {claim}: its directory is in use; delete that claim first (Retain keeps the data)"
            ),
            Refusal::NotReleased { pv, phase } => write!(
                f,
                "{pv} is {phase}, not Released; only the data of a deleted claim can be reused"
            ),
            Refusal::PurgeRequested { pv } => {
                write!(f, "{pv} is marked for purging; its data is being deleted")
            }
            Refusal::ReuseForAnother { pv, other } => {
                write!(f, "{pv} is already being reused for claim {other}")
            }
            Refusal::ClaimDeleting { claim } => write!(f, "claim {claim} is being deleted"),
            Refusal::ClaimBound { claim, volume } => write!(
                f,
                "claim {claim} is bound to {volume} already; create a new claim (kept Pending: no pod yet) for the data"
            ),
            Refusal::ClaimUnservable { claim, why } => write!(f, "claim {claim}: {why}"),
            Refusal::ClaimClones { claim } => write!(
                f,
                "claim {claim} has a dataSource (a clone); a claim for retained data must not name one"
            ),
            Refusal::ClassNotOurs { claim, class } => write!(
                f,
                "claim {claim} asks for StorageClass {class:?}, which is not a hostvol class; use a hostvol class"
            ),
            Refusal::TooSmall { claim, asks, limit } => write!(
                f,
                "claim {claim} asks for {}, less than the data's limit {}; ask for {} exactly",
                size(asks),
                size(limit),
                size(limit)
            ),
            Refusal::TooLarge { claim, asks, limit } => write!(
                f,
                "claim {claim} asks for {}, more than the data's limit {}; ask for {} exactly, then grow the claim",
                size(asks),
                size(limit),
                size(limit)
            ),
            Refusal::OtherNode {
                claim,
                selected,
                node,
            } => write!(
                f,
                "claim {claim} was scheduled to node {selected}, the data is on node {node}; re-create the claim and reuse before starting its pod"
            ),
            Refusal::DataLarger { claim, asks, used } => write!(
                f,
                "claim {claim} asks for {}, the directory holds {}; ask for at least {}",
                size(asks),
                size(used),
                size(used)
            ),
        }
    }
}

/// Whether the data of `volume` may become `claim`'s, in the order a person would fix things.
pub fn refusal(volume: &Volume, claim: &Claim) -> Option<Refusal> {
    let pv = volume.name.clone();
    let key = format!("{}/{}", claim.namespace, claim.name);
    if !volume.ours {
        return Some(Refusal::NotHostvol { pv });
    }
    if volume.phase == "Bound" {
        return Some(Refusal::InUse {
            pv,
            claim: volume.claim.clone(),
        });
    }
    if !matches!(volume.phase.as_str(), "Released" | "Failed") {
        return Some(Refusal::NotReleased {
            pv,
            phase: volume.phase.clone(),
        });
    }
    if volume.purge_requested {
        return Some(Refusal::PurgeRequested { pv });
    }
    if let Some(other) = &volume.reuse_for
        && other.uid != claim.uid
    {
        return Some(Refusal::ReuseForAnother {
            pv,
            other: other.key(),
        });
    }
    if let Some(refusal) = claim_refusal(claim) {
        return Some(refusal);
    }
    let (asks, limit) = (claim.requested_bytes, volume.capacity_bytes);
    if asks < limit {
        return Some(Refusal::TooSmall {
            claim: key,
            asks,
            limit,
        });
    }
    // The PV keeps the data's size (its limit); a larger claim would never bind to it. Growing is
    // the expansion path's job, once bound.
    if asks > limit {
        return Some(Refusal::TooLarge {
            claim: key,
            asks,
            limit,
        });
    }
    placed_elsewhere(claim, &volume.node)
}

/// What makes a claim unfit for any retained data: gone, bound, not a plain hostvol claim.
fn claim_refusal(claim: &Claim) -> Option<Refusal> {
    let key = format!("{}/{}", claim.namespace, claim.name);
    if claim.deleting {
        return Some(Refusal::ClaimDeleting { claim: key });
    }
    if let Some(bound) = claim.volume_name.as_ref().filter(|v| !v.is_empty()) {
        return Some(Refusal::ClaimBound {
            claim: key,
            volume: bound.clone(),
        });
    }
    if let Some(why) = &claim.unservable {
        return Some(Refusal::ClaimUnservable {
            claim: key,
            why: why.clone(),
        });
    }
    if claim.has_data_source {
        return Some(Refusal::ClaimClones { claim: key });
    }
    if !claim.class_ours {
        return Some(Refusal::ClassNotOurs {
            claim: key,
            class: claim.class.clone(),
        });
    }
    None
}

/// The claim placed on another node than `node` (empty: only the serving agent can tell).
fn placed_elsewhere(claim: &Claim, node: &str) -> Option<Refusal> {
    let selected = claim.selected_node.as_ref()?;
    (!node.is_empty() && selected != node).then(|| Refusal::OtherNode {
        claim: format!("{}/{}", claim.namespace, claim.name),
        selected: selected.clone(),
        node: node.to_string(),
    })
}

/// Whether an orphaned directory of `node` holding `used_bytes` (under the quota limit `limit`, if
/// it still has one) may become `claim`'s volume. No PV kept its size, so the claim's request
/// becomes its size and limit: it must be at least the old limit, and hold what is there.
pub fn directory_refusal(
    claim: &Claim,
    used_bytes: u64,
    limit: Option<u64>,
    node: &str,
) -> Option<Refusal> {
    if let Some(refusal) = claim_refusal(claim) {
        return Some(refusal);
    }
    if let Some(limit) = limit.filter(|l| claim.requested_bytes < *l) {
        return Some(Refusal::TooSmall {
            claim: format!("{}/{}", claim.namespace, claim.name),
            asks: claim.requested_bytes,
            limit,
        });
    }
    if claim.requested_bytes < used_bytes {
        return Some(Refusal::DataLarger {
            claim: format!("{}/{}", claim.namespace, claim.name),
            asks: claim.requested_bytes,
            used: used_bytes,
        });
    }
    placed_elsewhere(claim, node)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn released() -> Volume {
        Volume {
            name: "pvc-old".into(),
            ours: true,
            phase: "Released".into(),
            claim: "web/data".into(),
            capacity_bytes: GI,
            node: "node-a".into(),
            ..Default::default()
        }
    }

    fn pending() -> Claim {
        Claim {
            namespace: "web".into(),
            name: "data".into(),
            uid: "u2".into(),
            requested_bytes: GI,
            class: "hostvol".into(),
            class_ours: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_released_volume_goes_to_a_pending_claim_of_its_size() {
        assert_eq!(refusal(&released(), &pending()), None);
        let mut placed_here = pending();
        placed_here.selected_node = Some("node-a".into());
        assert_eq!(refusal(&released(), &placed_here), None);
        let mut failed = released();
        failed.phase = "Failed".into();
        assert_eq!(refusal(&failed, &pending()), None);
        // A label-pinned volume's node is its agent's to judge: the CLI does not refuse it.
        let mut pinned = released();
        pinned.node = String::new();
        let mut placed_on_rebuilt = pending();
        placed_on_rebuilt.selected_node = Some("node-a-rebuilt".into());
        assert_eq!(refusal(&pinned, &placed_on_rebuilt), None);
        // Asking again for the same claim (the CLI re-run) is fine.
        let mut marked = released();
        marked.reuse_for = Target::parse("web/data/u2");
        assert_eq!(refusal(&marked, &pending()), None);
    }

    #[test]
    fn each_refusal_in_the_order_a_person_fixes_things() {
        type Edit = fn(&mut Volume, &mut Claim);
        let cases: &[(&str, Edit, &str)] = &[
            (
                "foreign",
                |v, _| v.ours = false,
                "not provisioned by hostvol",
            ),
            (
                "bound pv",
                |v, _| v.phase = "Bound".into(),
                "is Bound to claim web/data: its directory is in use",
            ),
            (
                "available",
                |v, _| v.phase = "Available".into(),
                "is Available, not Released",
            ),
            (
                "purging",
                |v, _| v.purge_requested = true,
                "marked for purging",
            ),
            (
                "other reuse",
                |v, _| v.reuse_for = Target::parse("web/x/u9"),
                "already being reused for claim web/x",
            ),
            (
                "deleting",
                |_, c| c.deleting = true,
                "claim web/data is being deleted",
            ),
            (
                "bound claim",
                |_, c| c.volume_name = Some("pvc-u2".into()),
                "is bound to pvc-u2 already",
            ),
            (
                "block",
                |_, c| c.unservable = Some("volumeMode Block".into()),
                "claim web/data: volumeMode Block",
            ),
            ("clone", |_, c| c.has_data_source = true, "has a dataSource"),
            (
                "class",
                |_, c| {
                    c.class_ours = false;
                    c.class = "other".into()
                },
                "StorageClass \"other\", which is not a hostvol class",
            ),
            (
                "smaller",
                |_, c| c.requested_bytes = GI / 2,
                "asks for 512Mi, less than the data's limit 1Gi; ask for 1Gi exactly",
            ),
            (
                "larger",
                |_, c| c.requested_bytes = 2 * GI,
                "more than the data's limit 1Gi; ask for 1Gi exactly, then grow",
            ),
            (
                "elsewhere",
                |_, c| c.selected_node = Some("node-b".into()),
                "scheduled to node node-b, the data is on node node-a",
            ),
        ];
        for (case, edit, expected) in cases {
            let (mut v, mut c) = (released(), pending());
            edit(&mut v, &mut c);
            let why = refusal(&v, &c).unwrap_or_else(|| panic!("{case}: not refused"));
            let line = why.to_string();
            assert!(line.contains(expected), "{case}: {line}");
            assert!(!line.contains('\n'), "{case}: one line: {line}");
        }
    }

    #[test]
    fn the_bound_volume_is_refused_before_anything_about_the_claim() {
        let mut v = released();
        v.phase = "Bound".into();
        let mut c = pending();
        c.volume_name = Some("pvc-x".into());
        assert!(matches!(refusal(&v, &c), Some(Refusal::InUse { .. })));
    }

    #[test]
    fn targets_round_trip_and_reject_junk() {
        let t = Target::parse("web/data/0b6a-11").unwrap();
        assert_eq!(
            (t.namespace.as_str(), t.name.as_str(), t.uid.as_str()),
            ("web", "data", "0b6a-11")
        );
        assert_eq!(Target::parse(&t.record()), Some(t));
        for junk in [
            "",
            "web",
            "web/data",
            "web//u",
            "/data/u",
            "web/data/u/x",
            "web/data/",
        ] {
            assert_eq!(Target::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn an_orphaned_directory_goes_to_a_claim_that_holds_its_data() {
        let node = "node-a";
        type Case = (
            &'static str,
            fn(&mut Claim),
            u64,
            Option<u64>,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            ("exactly the data", |_| {}, GI, None, None),
            (
                "more than the data: the limit is the claim's",
                |c| c.requested_bytes = 2 * GI,
                GI,
                None,
                None,
            ),
            ("the old limit exactly", |_| {}, 1 << 20, Some(GI), None),
            (
                "placed here",
                |c| c.selected_node = Some("node-a".into()),
                0,
                None,
                None,
            ),
            (
                "less than the data",
                |c| c.requested_bytes = GI / 2,
                GI,
                None,
                Some("ask for at least 1Gi"),
            ),
            (
                "less than the old limit",
                |c| c.requested_bytes = GI / 2,
                1 << 20,
                Some(GI),
                Some("less than the data's limit 1Gi"),
            ),
            (
                "placed elsewhere",
                |c| c.selected_node = Some("node-b".into()),
                0,
                None,
                Some("scheduled to node node-b"),
            ),
            (
                "bound",
                |c| c.volume_name = Some("pvc-x".into()),
                0,
                None,
                Some("bound to pvc-x"),
            ),
            (
                "a clone",
                |c| c.has_data_source = true,
                0,
                None,
                Some("dataSource"),
            ),
            (
                "another provisioner's class",
                |c| c.class_ours = false,
                0,
                None,
                Some("not a hostvol class"),
            ),
            (
                "being deleted",
                |c| c.deleting = true,
                0,
                None,
                Some("being deleted"),
            ),
        ];
        for (case, change, used, limit, expected) in cases {
            let mut claim = pending();
            change(&mut claim);
            let got = directory_refusal(&claim, *used, *limit, node).map(|r| r.to_string());
            match expected {
                None => assert_eq!(got, None, "{case}"),
                Some(words) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(words)),
                    "{case}: {got:?}"
                ),
            }
        }
    }
}
