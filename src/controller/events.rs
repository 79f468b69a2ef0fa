//! Events where users look (`kubectl describe`): published off the critical path; a lost Event is
//! logged, never fatal.
//!
//! Not kube's `Recorder`: it keeps every Event it published, whole, for six minutes and prunes only
//! when it publishes again, so an agent that had just made 1,000 volumes held ~2,000 Events long after
//! they were gone. This one keeps a few words per Event (to count a repeat into the same Event, as a
//! series), at most `MAX_REMEMBERED`, and forgets an object's Events when the object goes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use tracing::{debug, warn};

use crate::domain::naming;

/// Repeats within this time go into the same Event (kube's Recorder uses the same six minutes).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// Bound on the Events remembered for series; the oldest go first.
pub const MAX_REMEMBERED: usize = 1024;

/// Who publishes: `reportingController` and `reportingInstance` of every Event.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
    /// The node, named as the source host of core/v1 Events (about PVs).
    pub node: String,
}

/// One Event published, reduced to what a repeat needs.
struct Sent {
    name: String,
    /// "namespace/name" of the object the Event is about, to forget it when the object goes.
    regarding: String,
    count: i32,
    at: Instant,
}

/// The Events published recently, keyed by a hash of (type, reason, action, object).
pub struct EventRecorder {
    reporter: Reporter,
    sent: Mutex<HashMap<u64, Sent>>,
}

impl EventRecorder {
    pub fn new(reporter: Reporter) -> Self {
        EventRecorder {
            reporter,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Events remembered now (for the state metric and tests).
    pub fn remembered(&self) -> usize {
        self.sent.lock().len()
    }

    /// Forgets the Events about objects `gone` says are gone ("namespace/name").
    pub fn forget(&self, gone: impl Fn(&str) -> bool) {
        let mut sent = self.sent.lock();
        sent.retain(|_, s| !gone(&s.regarding));
        shrink(&mut sent);
    }

    /// Remembers an Event about `regarding` as if published (for tests elsewhere).
    #[cfg(test)]
    pub fn remember_for_test(&self, regarding: &ObjectReference) {
        let (key, _) = self.next(EventType::Normal, "Test", "Test", regarding);
        self.remember(key, "test".into(), regarding, 1);
    }

    /// The Event to send: a new one, or the next of a series (with the name to patch).
    fn next(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        regarding: &ObjectReference,
    ) -> (u64, Option<(String, i32)>) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (type_ == EventType::Warning, reason, action).hash(&mut hasher);
        (&regarding.uid, &regarding.namespace, &regarding.name).hash(&mut hasher);
        let key = hasher.finish();
        let now = Instant::now();
        let mut sent = self.sent.lock();
        sent.retain(|_, s| now.duration_since(s.at) < SERIES_WINDOW);
        shrink(&mut sent);
        let repeat = sent.get(&key).map(|s| (s.name.clone(), s.count + 1));
        (key, repeat)
    }

    fn remember(&self, key: u64, name: String, regarding: &ObjectReference, count: i32) {
        let mut sent = self.sent.lock();
        if sent.len() >= MAX_REMEMBERED
            && !sent.contains_key(&key)
            && let Some(oldest) = sent.iter().min_by_key(|(_, s)| s.at).map(|(k, _)| *k)
        {
            sent.remove(&oldest);
        }
        sent.insert(
            key,
            Sent {
                name,
                regarding: format!(
                    "{}/{}",
                    regarding.namespace.as_deref().unwrap_or(""),
                    regarding.name.as_deref().unwrap_or("")
                ),
                count,
                at: Instant::now(),
            },
        );
    }
}

/// Gives memory back once a burst of Events is forgotten (a cleared map keeps its buckets).
fn shrink(sent: &mut HashMap<u64, Sent>) {
    if sent.capacity() > 64 && sent.len() < sent.capacity() / 4 {
        sent.shrink_to_fit();
    }
}

/// Publishing goes through the recorder itself, so it needs nothing of the agent's context but a
/// client: the context uses the recorder, never the other way round.
impl EventRecorder {
    /// Events are published off the critical path; a lost Event is logged, never fatal.
    pub fn publish(
        self: &Arc<Self>,
        client: &Client,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.publish_inner(client, regarding, type_, reason, action, note, None);
    }

    /// An Event that states a fact about an object (its volume deleted, its claim provisioned):
    /// published once per (object uid, reason), even when a retried reconcile or a restarted agent
    /// reaches the same point again. Its name is derived from both, so the API server refuses a
    /// second create (409), which is taken as "already said".
    pub fn publish_fact(
        self: &Arc<Self>,
        client: &Client,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let name = fact_event_name(regarding, reason);
        self.publish_inner(client, regarding, type_, reason, action, note, Some(name));
    }

    #[allow(clippy::too_many_arguments)]
    fn publish_inner(
        self: &Arc<Self>,
        client: &Client,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        fact: Option<String>,
    ) {
        let regarding = regarding.clone();
        if needs_core_event(&regarding) {
            self.publish_core(client, regarding, type_, reason, note, fact);
            return;
        }
        let (key, repeat) = self.next(type_, reason, action, &regarding);
        // A fact is never a series: it is said once.
        let repeat = if fact.is_some() { None } else { repeat };
        let client = client.clone();
        let ctx_events = Arc::clone(self);
        let reporter = self.reporter.clone();
        let (reason, action) = (reason.to_string(), action.to_string());
        tokio::spawn(async move {
            let namespace = regarding.namespace.clone().unwrap_or_default();
            let api: Api<K8sEvent> = Api::namespaced(client, &namespace);
            let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
            let result = match repeat {
                Some((name, count)) => {
                    let series = EventSeries {
                        count,
                        last_observed_time: now,
                    };
                    let patch = serde_json::json!({ "series": series });
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| (name, count))
                }
                None => {
                    let name = fact.clone().unwrap_or_else(|| {
                        naming::event_name(
                            regarding.name.as_deref().unwrap_or(&reporter.controller),
                            now.0.as_nanosecond(),
                        )
                    });
                    let event = new_event(
                        &reporter, &name, &regarding, type_, &reason, &action, &note, now,
                    );
                    api.create(&PostParams::default(), &event)
                        .await
                        .map(|_| (name, 1))
                }
            };
            match result {
                Ok((name, count)) => ctx_events.remember(key, name, &regarding, count),
                Err(kube::Error::Api(status)) if status.code == 409 && fact.is_some() => {
                    debug!(%reason, "Event already published for this fact")
                }
                Err(error) => warn!(%error, %reason, "could not publish Event"),
            }
        });
    }

    /// Cluster-scoped objects (PVs): some servers (1.20) reject events.k8s.io Events for them, so use
    /// a core/v1 Event in "default", as Kubernetes' own PV controller does.
    fn publish_core(
        &self,
        client: &Client,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        fact: Option<String>,
    ) {
        let client = client.clone();
        let (node, provisioner) = (self.reporter.node.clone(), self.reporter.controller.clone());
        let reason = reason.to_string();
        tokio::spawn(async move {
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            );
            let event = k8s_openapi::api::core::v1::Event {
                metadata: kube::api::ObjectMeta {
                    generate_name: fact
                        .is_none()
                        .then(|| format!("{}.", regarding.name.clone().unwrap_or_default())),
                    name: fact.clone(),
                    namespace: Some("default".into()),
                    ..Default::default()
                },
                involved_object: regarding,
                reason: Some(reason.clone()),
                message: Some(bounded_note(&note).to_string()),
                type_: Some(event_type(type_).into()),
                source: Some(k8s_openapi::api::core::v1::EventSource {
                    component: Some(provisioner.clone()),
                    host: Some(node.clone()),
                }),
                first_timestamp: Some(now.clone()),
                last_timestamp: Some(now),
                count: Some(1),
                reporting_component: Some(provisioner),
                reporting_instance: Some(node),
                ..Default::default()
            };
            let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
            match events.create(&PostParams::default(), &event).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 && fact.is_some() => {
                    debug!(%reason, "Event already published for this fact")
                }
                Err(error) => warn!(%error, %reason, "could not publish Event"),
            }
        });
    }
}

/// Cluster-scoped objects (no namespace) get a core/v1 Event instead: see `publish_core`.
fn needs_core_event(regarding: &ObjectReference) -> bool {
    regarding.namespace.as_deref().unwrap_or("").is_empty()
}

/// The most of a note the API server takes (`events.k8s.io/v1` validation: at most 1 kB).
const NOTE_LIMIT: usize = 1024;

/// `note` cut to [`NOTE_LIMIT`] bytes at a character boundary, so a long message (many data roots,
/// a long path) never costs the whole Event a 422.
fn bounded_note(note: &str) -> &str {
    if note.len() <= NOTE_LIMIT {
        return note;
    }
    let mut end = NOTE_LIMIT;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    &note[..end]
}

/// A new `events.k8s.io/v1` Event about a namespaced object, in that object's namespace, with every
/// field the v1 API requires (`eventTime`, `reportingController`, `reportingInstance`, `action`,
/// `reason`, `type`) and a bounded note.
#[allow(clippy::too_many_arguments)]
fn new_event(
    reporter: &Reporter,
    name: &str,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
    now: MicroTime,
) -> K8sEvent {
    K8sEvent {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        action: Some(action.to_string()),
        reason: Some(reason.to_string()),
        note: Some(bounded_note(note).to_string()),
        event_time: Some(now),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        type_: Some(event_type(type_).into()),
        ..Default::default()
    }
}

/// The name of the one Event stating `reason` about this object (this very object: its uid).
fn fact_event_name(regarding: &ObjectReference, reason: &str) -> String {
    // FNV-1a: stable across processes and versions (std's hasher is not).
    let fact = format!("{}/{reason}", regarding.uid.as_deref().unwrap_or_default());
    let hash = fact.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    naming::event_name(
        regarding.name.as_deref().unwrap_or("hostvol"),
        i128::from(hash),
    )
}

fn event_type(type_: EventType) -> &'static str {
    match type_ {
        EventType::Warning => "Warning",
        EventType::Normal => "Normal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(ns: &str, name: &str) -> ObjectReference {
        ObjectReference {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn recorder() -> EventRecorder {
        EventRecorder::new(Reporter {
            controller: "c".into(),
            instance: "i".into(),
            node: "n".into(),
        })
    }

    #[test]
    fn a_fact_has_one_name_per_object_and_reason() {
        let a = object("ns", "a");
        let name = fact_event_name(&a, "VolumeDeleted");
        assert_eq!(name, fact_event_name(&a, "VolumeDeleted"), "stable");
        assert_ne!(name, fact_event_name(&a, "ProvisioningSucceeded"));
        let mut again = object("ns", "a");
        again.uid = Some("another-uid".into());
        assert_ne!(
            name,
            fact_event_name(&again, "VolumeDeleted"),
            "a new object of the same name"
        );
        assert!(name.starts_with("a.") && name.len() <= 253);
    }

    #[test]
    fn a_repeat_continues_the_series() {
        let r = recorder();
        let a = object("ns", "a");
        let (key, repeat) = r.next(EventType::Warning, "Refused", "Provision", &a);
        assert!(repeat.is_none());
        r.remember(key, "a.1".into(), &a, 1);
        let (again, repeat) = r.next(EventType::Warning, "Refused", "Provision", &a);
        assert_eq!((again, repeat), (key, Some(("a.1".to_string(), 2))));
        let (_, other) = r.next(EventType::Normal, "Provisioned", "Provision", &a);
        assert!(other.is_none(), "another reason is another Event");
    }

    #[test]
    fn events_of_gone_objects_are_forgotten_and_the_cache_is_bounded() {
        let r = recorder();
        for i in 0..MAX_REMEMBERED + 10 {
            let o = object("ns", &format!("c{i}"));
            let (key, _) = r.next(EventType::Normal, "Provisioned", "Provision", &o);
            r.remember(key, format!("c{i}.1"), &o, 1);
        }
        assert_eq!(r.remembered(), MAX_REMEMBERED);
        r.forget(|regarding| regarding.starts_with("ns/"));
        assert_eq!(r.remembered(), 0);
    }

    #[test]
    fn a_new_event_is_a_valid_events_k8s_io_v1_event() {
        let reporter = Reporter {
            controller: "hostvol.io/hostvol".into(),
            instance: "hostvol-node-a".into(),
            node: "node-a".into(),
        };
        let now = MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap());
        let claim = object("team", "data");
        let long = "é".repeat(700); // 1,400 bytes
        let event = new_event(
            &reporter,
            "data.1",
            &claim,
            EventType::Warning,
            "ProvisioningFailed",
            "Provision",
            &long,
            now,
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["apiVersion"], "events.k8s.io/v1");
        assert_eq!(json["kind"], "Event");
        // The fields v1 validation requires, with the Event in its object's namespace.
        for field in [
            "eventTime",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "type",
        ] {
            assert!(
                json[field].as_str().is_some_and(|v| !v.is_empty()),
                "{field}: {json}"
            );
        }
        assert_eq!(json["metadata"]["namespace"], "team");
        assert_eq!(json["regarding"]["namespace"], "team");
        assert_eq!(json["type"], "Warning");
        // MicroTime: RFC 3339 with microseconds, as the server stores eventTime.
        assert_eq!(json["eventTime"], "2023-11-14T22:13:20.000000Z");
        let note = json["note"].as_str().unwrap();
        assert!(
            note.len() <= NOTE_LIMIT && long.starts_with(note),
            "{}",
            note.len()
        );
        // What a 1.20 server returns for it reads back.
        let back: K8sEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back.reason.as_deref(), Some("ProvisioningFailed"));
    }

    #[test]
    fn a_repeat_is_a_series_patch_and_a_volume_gets_a_core_event() {
        let series = EventSeries {
            count: 2,
            last_observed_time: MicroTime(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        };
        let patch = serde_json::json!({ "series": series });
        assert_eq!(patch["series"]["count"], 2);
        assert_eq!(
            patch["series"]["lastObservedTime"],
            "1970-01-01T00:00:00.000000Z"
        );
        let pv = ObjectReference {
            kind: Some("PersistentVolume".into()),
            name: Some("pvc-1".into()),
            ..Default::default()
        };
        assert!(needs_core_event(&pv));
        assert!(!needs_core_event(&object("team", "data")));
        assert_eq!(bounded_note("short"), "short");
    }
}
