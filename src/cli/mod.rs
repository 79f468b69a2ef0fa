//! Flags of every command ([`args`]) and the commands for people: capacity and volume reports,
//! doctor, purge, reuse. Talks to agents over gRPC and to the API server; uses [`crate::service::grpc`],
//! [`crate::controller`] constants and the layers below.

pub mod agents;
pub mod args;
pub mod purge;
pub mod report;
pub mod reuse;
