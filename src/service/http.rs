//! HTTP endpoints for the kubelet's probes and Prometheus: /healthz, /readyz, /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use tokio_util::sync::CancellationToken;

use crate::controller::metrics::Metrics;
use crate::controller::supervisor::Health;

#[derive(Clone)]
struct HttpState {
    ready: Arc<AtomicBool>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Serves until `shutdown` is cancelled. `ready` turns true once the agent's watches have synced;
/// `/healthz` fails while a vital task is down (the supervisor says which).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ready: Arc<AtomicBool>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(HttpState {
            ready,
            health,
            metrics,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.health.check() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(down) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("vital task down: {down}"),
        ),
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "watches not synced yet")
    }
}

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
