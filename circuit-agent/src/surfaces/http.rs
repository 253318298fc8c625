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
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};

use super::metrics::Metrics;
use crate::time::{Clock, MonoTime, MonotonicClock};

/// Connections served at once: a scraper and a kubelet or two. Beyond it a new connection is
/// closed at once, so idle sockets cannot take the agent past its memory limit.
const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send a request's headers, and a connection lives at most
/// `CONNECTION_LIFETIME` (a scrape takes milliseconds; keep-alive reconnects after it).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Requests are a line and a few headers.
const MAX_BUFFER: usize = 16 * 1024;

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
    /// None on a health-only endpoint.
    metrics: Option<Arc<Metrics>>,
    health: Arc<Health>,
}

/// Binds `addr` now (so a taken port is a start-up error) and serves /healthz, /readyz and,
/// with `metrics`, /metrics until the runtime ends. A health-only endpoint names no upstream,
/// so it can listen where every pod reaches it (the kubelet's probes) while /metrics stays on
/// loopback.
pub async fn serve(
    addr: SocketAddr,
    metrics: Option<Arc<Metrics>>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let what = if metrics.is_some() {
        "metrics and health"
    } else {
        "health"
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))?;
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    if metrics.is_some() {
        app = app.route("/metrics", get(metrics_page));
    }
    serve_connections(listener, app.with_state(Shared { metrics, health }));
    Ok(())
}

/// Serves each connection with a header timeout, small buffers and a lifetime, at most
/// `MAX_CONNECTIONS` at once.
fn serve_connections(listener: tokio::net::TcpListener, app: Router) {
    super::accept::spawn(
        "metrics endpoint",
        listener,
        MAX_CONNECTIONS,
        move |stream| {
            let service = TowerToHyperService::new(app.clone());
            async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_BUFFER)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            }
        },
    );
}

async fn metrics_page(State(shared): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared
            .metrics
            .as_ref()
            .map(|metrics| metrics.encode())
            .unwrap_or_default(),
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
