//! Events where users look (`kubectl describe`): published off the critical path; a lost Event is
//! logged, never fatal.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use crate::controller::context::Context;

impl Context {
    /// Events are published off the critical path; a lost Event is logged, never fatal.
    pub fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let regarding = regarding.clone();
        if regarding.namespace.as_deref().unwrap_or("").is_empty() {
            // Cluster-scoped objects (PVs): some servers (1.20) reject events.k8s.io Events for them, so
            // use a core/v1 Event in "default", as Kubernetes' own PV controller does.
            let client = self.client.clone();
            let (node, provisioner) = (
                self.settings.node.clone(),
                self.settings.provisioner.clone(),
            );
            let reason = reason.to_string();
            tokio::spawn(async move {
                let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                );
                let event = k8s_openapi::api::core::v1::Event {
                    metadata: kube::api::ObjectMeta {
                        generate_name: Some(format!(
                            "{}.",
                            regarding.name.clone().unwrap_or_default()
                        )),
                        namespace: Some("default".into()),
                        ..Default::default()
                    },
                    involved_object: regarding,
                    reason: Some(reason.clone()),
                    message: Some(note),
                    type_: Some(
                        if type_ == EventType::Warning {
                            "Warning"
                        } else {
                            "Normal"
                        }
                        .into(),
                    ),
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
                let events: Api<k8s_openapi::api::core::v1::Event> =
                    Api::namespaced(client, "default");
                if let Err(error) = events.create(&PostParams::default(), &event).await {
                    warn!(%error, %reason, "could not publish Event");
                }
            });
            return;
        }
        let recorder = self.recorder.clone();
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &regarding).await {
                warn!(%error, reason = %event.reason, "could not publish Event");
            }
        });
    }
}
