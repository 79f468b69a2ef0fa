//! What the agent serves: the gRPC node service (generated code quarantined in [`grpc`]) and the
//! HTTP probes and metrics. Uses [`crate::controller`] and the layers below it.

pub mod grpc;
pub mod http;
pub mod node_service;
