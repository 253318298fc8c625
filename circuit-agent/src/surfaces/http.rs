//! The agent's HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (programs attached, maps pinned, the event loop turning).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use circuit_common::map_names;

use super::metrics::Metrics;
use crate::time::{Clock, MonoTime, MonotonicClock};

/// How long the event loop may go without turning before the agent is not ready. The loop
/// wakes at least every lease-renewal interval, so this is generous.
const LOOP_STALL: Duration = Duration::from_secs(30);

/// What `/readyz` checks, updated by the daemon.
#[derive(Debug)]
pub struct Health {
    attached: AtomicBool,
    last_turn_ns: AtomicU64,
    pin_dir: PathBuf,
}

impl Health {
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            attached: AtomicBool::new(false),
            last_turn_ns: AtomicU64::new(0),
            pin_dir,
        }
    }

    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }

    /// Called on every turn of the event loop.
    pub fn turned(&self, now: MonoTime) {
        self.last_turn_ns.store(now.as_nanos(), Ordering::Relaxed);
    }

    /// Why the agent is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.attached.load(Ordering::Relaxed) {
            return Some("programs not attached yet".into());
        }
        if !self.pin_dir.join(map_names::VERDICTS).exists() {
            return Some(format!(
                "verdict map not pinned in {}",
                self.pin_dir.display()
            ));
        }
        let last = MonoTime::from_nanos(self.last_turn_ns.load(Ordering::Relaxed));
        let idle = MonotonicClock.now().since(last);
        (idle > LOOP_STALL).then(|| format!("event loop stalled for {}s", idle.as_secs()))
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Binds `addr` now (so a taken port is a start-up error) and serves until the runtime ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics and health"))?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Shared { metrics, health });
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics_page(State(shared): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    match shared.health.not_ready() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
