//! The agent's local control API: a Unix socket only root can open (mode 0600 in a 0700
//! directory), newline-delimited JSON. One request line per connection:
//!
//! - `{"cmd":"status"}` → one line: `{"breakers":[Breaker…]}`
//! - `{"cmd":"inspect","upstream":"10.0.0.1:80"}` → one line: an Inspection
//! - `{"cmd":"recent"}` → one line per transition the agent remembers (up to 16 per
//!   upstream), oldest first per upstream, then the connection closes
//! - `{"cmd":"events"}` → the lines of `recent`, then one line per transition as it
//!   happens, until the client leaves
//! - operator commands, answered by the agent, which alone writes kernel verdicts:
//!   `{"cmd":"trip","upstream":"10.0.0.1:80","duration_ms":600000}` (no `duration_ms`: until
//!   reset), `{"cmd":"reset",…}`, `{"cmd":"disable",…}`, `{"cmd":"enable",…}` → one line:
//!   an [`OperatorReply`]
//!
//! The JSON shapes are documented in docs/JSON.md and kept stable.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    sync::{broadcast, mpsc, oneshot},
};

use circuit_common::VerdictState;

use crate::{
    engine::{
        BreakerState, Breakers, ClientHold, Clock, OutcomeCounts, ServiceState, Transition,
        policy::AsWritten,
    },
    kernel::{CgroupNames, StoredVerdict},
    lock::ExclusiveLock,
    ports::VerdictStore,
    time::MonoTime,
};

/// Transitions kept per upstream for `inspect`, and upstreams with kept transitions.
const RECENT_PER_UPSTREAM: usize = 16;
const RECENT_UPSTREAMS: usize = 4_096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Inspect {
        upstream: SocketAddr,
    },
    Recent,
    Events,
    #[serde(untagged)]
    Operator(OperatorCommand),
}

/// What an operator asks of a breaker (`circuit-agent trip|reset|disable|enable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum OperatorCommand {
    /// FORCED_OPEN for `duration_ms`, or until reset or enabled.
    Trip {
        upstream: SocketAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    /// Back to CLOSED with its history forgotten; lifts a trip or a disable.
    Reset { upstream: SocketAddr },
    /// DISABLED: never isolated, until enabled or reset.
    Disable { upstream: SocketAddr },
    /// Lifts a trip or a disable.
    Enable { upstream: SocketAddr },
}

impl OperatorCommand {
    pub fn upstream(&self) -> SocketAddr {
        match *self {
            OperatorCommand::Trip { upstream, .. }
            | OperatorCommand::Reset { upstream }
            | OperatorCommand::Disable { upstream }
            | OperatorCommand::Enable { upstream } => upstream,
        }
    }
}

/// The agent's answer to an [`OperatorCommand`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatorReply {
    pub upstream: SocketAddr,
    /// Whether the command was carried out; when not, `message` says why.
    pub applied: bool,
    /// The breaker's state afterwards (as in `status`).
    pub state: Option<BreakerState>,
    pub message: String,
}

/// A request the daemon's event loop answers (it owns the engine).
pub struct ControlRequest {
    pub query: Query,
    reply: oneshot::Sender<String>,
}

impl ControlRequest {
    /// Sends the answer (the requester may have left: then nobody hears it).
    pub fn reply(self, answer: &impl Serialize) {
        let json = serde_json::to_string(answer)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
        let _ = self.reply.send(json);
    }
}

pub enum Query {
    Status,
    Inspect(SocketAddr),
    Operator(OperatorCommand),
}

/// One breaker in `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BreakerRow {
    pub upstream: SocketAddr,
    pub state: BreakerState,
    pub group: Option<String>,
    /// Seconds in the current state.
    pub since_seconds: f64,
    /// Calls and failures in the sliding window (absent without a window policy).
    pub window_calls: Option<u32>,
    pub window_failures: Option<u32>,
    pub failure_rate: Option<f64>,
    pub consecutive_failures: u32,
    /// Seconds until the breaker admits probes (OPEN) or starts its next probe round
    /// (HALF_OPEN).
    pub next_probe_seconds: Option<f64>,
    /// Connections rejected by circuit that reached the TCP stack (XDP, TC).
    pub rejects: u64,
    pub counts: OutcomeCounts,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub breakers: Vec<BreakerRow>,
    /// Clients failed fast on their own (client-scoped verdicts, the cgroup hook's alone).
    #[serde(default)]
    pub client_holds: Vec<ClientHoldRow>,
    /// Virtual addresses and the endpoints their NAT was seen to pick.
    #[serde(default)]
    pub services: Vec<ServiceRow>,
}

/// A service (a virtual address) with its endpoints (`status`, `inspect VIP`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceRow {
    pub service: SocketAddr,
    /// Derived from the endpoints' breakers: `open` only when every endpoint is isolated.
    pub state: ServiceState,
    /// Whether connects may be re-routed (`[services]`).
    pub reroute: bool,
    pub endpoints: Vec<EndpointRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointRow {
    pub endpoint: SocketAddr,
    /// None when the endpoint has no breaker now (evicted idle, never isolated).
    pub state: Option<BreakerState>,
    /// Clients failed fast at it on their own (re-routed around it for them alone).
    pub client_holds: usize,
}

impl ServiceRow {
    pub fn of<C: Clock>(breakers: &Breakers<C>, service: SocketAddr) -> Self {
        Self {
            service,
            state: breakers.service_state(&service),
            reroute: breakers.reroutes(&service),
            endpoints: breakers
                .services()
                .endpoints(&service)
                .map(|endpoint| EndpointRow {
                    endpoint,
                    state: breakers.get(&endpoint).map(|b| b.state()),
                    client_holds: breakers.client_holds_of(endpoint).count(),
                })
                .collect(),
        }
    }
}

/// One client failed fast at one upstream, without isolating it for anyone else.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientHoldRow {
    pub upstream: SocketAddr,
    /// The client's cgroup id, and its path in the cgroup v2 tree when found.
    pub client: u64,
    pub client_path: Option<String>,
    pub seconds_left: f64,
    pub dry_run: bool,
}

impl ClientHoldRow {
    fn of(hold: &ClientHold, now: MonoTime, names: Option<&mut CgroupNames>) -> Self {
        Self {
            upstream: hold.upstream,
            client: hold.client.0,
            client_path: names.and_then(|n| n.path(hold.client.0)),
            seconds_left: hold.until.since(now).as_secs_f64(),
            dry_run: hold.dry_run,
        }
    }
}

/// A transition, as `events` streams it and `inspect` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub upstream: SocketAddr,
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: String,
    pub reason_kind: String,
    pub dry_run: bool,
    /// CLOCK_MONOTONIC seconds.
    pub at_seconds: f64,
    pub detect_to_verdict_us: Option<u64>,
    pub counts: OutcomeCounts,
    /// `node`: the upstream's own breaker, which every process and XDP/TC obey; `client`:
    /// one client failed fast (or released) on its own, by the cgroup hook alone.
    #[serde(default)]
    pub scope: EventScope,
    /// For `client` scope: the client's cgroup id, and its path when found.
    #[serde(default)]
    pub client: Option<u64>,
    #[serde(default)]
    pub client_path: Option<String>,
    /// The virtual address the upstream is an endpoint of, when it is one.
    #[serde(default)]
    pub service: Option<SocketAddr>,
}

/// Whom a transition applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventScope {
    /// The upstream's own breaker, which every process and XDP/TC obey.
    #[default]
    Node,
    /// One client, failed fast (or released) by the cgroup hook alone.
    Client,
}

impl EventScope {
    pub const fn of(t: &Transition) -> Self {
        if t.client.is_some() {
            Self::Client
        } else {
            Self::Node
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            EventScope::Node => "node",
            EventScope::Client => "client",
        }
    }
}

/// A verdict's state in the kernel's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KernelVerdictState {
    Open,
    HalfOpen,
    Partial,
}

impl KernelVerdictState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::HalfOpen => "HALF_OPEN",
            Self::Partial => "PARTIAL",
        }
    }
}

impl std::fmt::Display for KernelVerdictState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<VerdictState> for KernelVerdictState {
    fn from(state: VerdictState) -> Self {
        match state {
            VerdictState::Open => Self::Open,
            VerdictState::HalfOpen => Self::HalfOpen,
            VerdictState::Partial => Self::Partial,
        }
    }
}

/// The kernel's verdict, as `inspect` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KernelVerdict {
    pub state: KernelVerdictState,
    pub probe_budget: u32,
    pub probes_admitted: u64,
    pub reject_fraction: f64,
    pub dry_run: bool,
    pub lease_left_seconds: f64,
}

impl KernelVerdict {
    pub fn of(v: &StoredVerdict, now: MonoTime) -> Self {
        Self {
            state: v.state.into(),
            probe_budget: v.probe_budget,
            probes_admitted: v.probes_admitted,
            reject_fraction: f64::from(v.reject_fraction) / 65_536.0,
            dry_run: v.dry_run,
            lease_left_seconds: v.lease_expires.since(now).as_secs_f64(),
        }
    }
}

/// What one client has lately seen of an upstream (`inspect`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WitnessRow {
    pub client: u64,
    pub client_path: Option<String>,
    /// Seconds since its last failure / success here, if any within the witness window.
    pub failure_seconds_ago: Option<f64>,
    pub success_seconds_ago: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Inspection {
    pub breaker: Option<BreakerRow>,
    /// When the address is a service's virtual address: its endpoints and their states.
    /// When it is an endpoint: the services it is behind.
    #[serde(default)]
    pub service: Option<ServiceRow>,
    #[serde(default)]
    pub behind: Vec<SocketAddr>,
    /// The clients whose outcomes decide the scope of a trip (see `min_witnesses`).
    #[serde(default)]
    pub witnesses: Vec<WitnessRow>,
    /// Clients of this upstream failed fast on their own.
    #[serde(default)]
    pub client_holds: Vec<ClientHoldRow>,
    /// The policy applied to this upstream (after groups and overrides), as the
    /// configuration file writes it.
    pub policy: Option<serde_json::Value>,
    pub recent_transitions: Vec<Event>,
    pub kernel_verdict: Option<KernelVerdict>,
}

/// Every remembered transition, oldest first.
fn sorted(recent: &HashMap<SocketAddr, VecDeque<Event>>) -> Vec<Event> {
    let mut all: Vec<Event> = recent.values().flatten().cloned().collect();
    all.sort_by(|a, b| a.at_seconds.total_cmp(&b.at_seconds));
    all
}

/// Fans transitions out to `events` subscribers and keeps the recent ones for `inspect`.
#[derive(Clone)]
pub struct EventHub {
    live: broadcast::Sender<String>,
    recent: Arc<Mutex<HashMap<SocketAddr, VecDeque<Event>>>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            live: broadcast::channel(1_024).0,
            recent: Arc::default(),
        }
    }
}

impl EventHub {
    pub fn publish(
        &self,
        t: &Transition,
        detect_to_verdict: Option<Duration>,
        client_path: Option<String>,
        service: Option<SocketAddr>,
    ) {
        let event = Event {
            upstream: t.upstream,
            from: t.change.from,
            to: t.change.to,
            reason: t.change.reason.to_string(),
            reason_kind: t.change.reason.kind().to_owned(),
            dry_run: t.dry_run,
            at_seconds: t.change.at.as_nanos() as f64 / 1e9,
            detect_to_verdict_us: detect_to_verdict.map(|d| d.as_micros() as u64),
            counts: t.counts,
            scope: EventScope::of(t),
            client: t.client.map(|c| c.0),
            client_path,
            service,
        };
        let line = serde_json::to_string(&event);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        // Sent under the lock, as followers subscribe under it (`follow`): each transition
        // reaches a follower exactly once, in its replay or live.
        if let Ok(line) = line {
            // No subscriber is fine.
            let _ = self.live.send(line);
        }
        if recent.len() >= RECENT_UPSTREAMS && !recent.contains_key(&t.upstream) {
            // Bounded: forget some upstream's history rather than grow.
            if let Some(victim) = recent.keys().next().copied() {
                recent.remove(&victim);
            }
        }
        let list = recent.entry(t.upstream).or_default();
        if list.len() == RECENT_PER_UPSTREAM {
            list.pop_front();
        }
        list.push_back(event);
    }

    fn all_recent(&self) -> Vec<Event> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        sorted(&recent)
    }

    /// The recent transitions and a subscription to the ones after them, taken together.
    fn follow(&self) -> (Vec<Event>, broadcast::Receiver<String>) {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        (sorted(&recent), self.live.subscribe())
    }

    /// The recent transitions of `upstream`, oldest first.
    pub fn recent(&self, upstream: SocketAddr) -> Vec<Event> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent
            .get(&upstream)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Sessions served at once: a CLI or two and a few `events` followers; more is someone
/// holding sockets open.
const MAX_SESSIONS: usize = 64;
/// A request is one short JSON line.
const MAX_REQUEST_BYTES: u64 = 4_096;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one reply line may wait for the client to read it: a follower that stops
/// reading is dropped, not buffered for.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control socket while the agent runs: it holds the socket's lock, and removes the
/// socket when the agent stops, however it stops.
pub struct ControlSocket {
    path: PathBuf,
    _lock: ExclusiveLock,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` and returns the socket's guard and the requests the event loop must
/// answer. Only a stale socket is replaced: anything else at `path` is an error, and so is
/// a socket another agent holds. A missing parent directory is created 0700; an existing
/// one is left as it is (the socket itself is 0600).
pub fn serve(
    path: &Path,
    hub: EventHub,
) -> anyhow::Result<(ControlSocket, mpsc::Receiver<ControlRequest>)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // The lock lives next to the socket, so two pin dirs that map to one socket name
    // cannot both serve it.
    let lock_path = path.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let lock = ExclusiveLock::try_new(lock_file, &lock_path, "another circuit agent")?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot replace {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket: circuit will not replace it (choose another --socket)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let socket = ControlSocket {
        path: path.to_owned(),
        _lock: lock,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let (tx, rx) = mpsc::channel(64);
    super::accept::spawn("control socket", listener, MAX_SESSIONS, move |stream| {
        let (tx, hub) = (tx.clone(), hub.clone());
        async move {
            if let Err(err) = session(stream, tx, hub).await {
                tracing::debug!(%err, "control session ended");
            }
        }
    });
    Ok((socket, rx))
}

/// Writes one line, or gives up on a client that does not read it in time.
async fn write_line(write: &mut OwnedWriteHalf, line: &str) -> anyhow::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&bytes))
        .await
        .context("the client does not read its replies")??;
    Ok(())
}

async fn session(
    stream: UnixStream,
    requests: mpsc::Sender<ControlRequest>,
    hub: EventHub,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES + 1);
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("no request line in time")??;
    if line.len() as u64 > MAX_REQUEST_BYTES {
        let msg = serde_json::json!({ "error": format!("bad request: longer than {MAX_REQUEST_BYTES} bytes") });
        return write_line(&mut write, &msg.to_string()).await;
    }
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(err) => {
            let msg = serde_json::json!({ "error": format!("bad request: {err}") });
            return write_line(&mut write, &msg.to_string()).await;
        }
    };
    let query = match request {
        Request::Status => Query::Status,
        Request::Inspect { upstream } => Query::Inspect(upstream),
        Request::Operator(command) => Query::Operator(command),
        Request::Recent => {
            for event in hub.all_recent() {
                write_line(&mut write, &serde_json::to_string(&event)?).await?;
            }
            return Ok(());
        }
        Request::Events => {
            // The recent ones first: a follower that starts late still sees what just
            // happened (and an operator wants the context anyway).
            let (replay, mut live) = hub.follow();
            for event in replay {
                write_line(&mut write, &serde_json::to_string(&event)?).await?;
            }
            loop {
                match live.recv().await {
                    Ok(line) => write_line(&mut write, &line).await?,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let msg = serde_json::json!({ "lagged": n });
                        write_line(&mut write, &msg.to_string()).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    };
    let (reply, answer) = oneshot::channel();
    requests
        .send(ControlRequest { query, reply })
        .await
        .context("agent is stopping")?;
    let answer = answer.await.context("agent dropped the request")?;
    write_line(&mut write, &answer).await
}

fn row<C: Clock>(breakers: &mut Breakers<C>, upstream: SocketAddr) -> Option<BreakerRow> {
    let now = breakers.now();
    let window = breakers.window_totals(&upstream);
    let policy_deadline = breakers
        .policy_of(&upstream)
        .cloned()
        .and_then(|p| breakers.get(&upstream)?.deadline(&p));
    let group = breakers.group_of(&upstream).map(str::to_owned);
    let b = breakers.get(&upstream)?;
    let counts = b.counts();
    Some(BreakerRow {
        upstream,
        state: b.state(),
        group,
        since_seconds: now.since(b.since()).as_secs_f64(),
        window_calls: window.map(|w| w.calls),
        window_failures: window.map(|w| w.failures),
        failure_rate: window
            .filter(|w| w.calls > 0)
            .map(|w| f64::from(w.failures) / f64::from(w.calls)),
        consecutive_failures: b.consecutive_failures(),
        next_probe_seconds: matches!(b.state(), BreakerState::Open | BreakerState::HalfOpen)
            .then(|| policy_deadline.map(|d| d.since(now).as_secs_f64()))
            .flatten(),
        rejects: counts.rejected,
        counts,
    })
}

/// Answers one read-only request from the engine's and the kernel's state (operator
/// commands are the daemon's).
pub fn answer<C: Clock>(
    request: ControlRequest,
    breakers: &mut Breakers<C>,
    verdicts: &impl VerdictStore,
    hub: &EventHub,
    mut names: Option<&mut CgroupNames>,
) {
    let json = match request.query {
        Query::Operator(command) => {
            let reply = OperatorReply {
                upstream: command.upstream(),
                applied: false,
                state: None,
                message: "operator commands are answered by the daemon".to_owned(),
            };
            return request.reply(&reply);
        }
        Query::Status => {
            let mut upstreams: Vec<SocketAddr> = breakers.iter().map(|(u, _)| u).collect();
            upstreams.sort_by_key(|u| (u.ip(), u.port()));
            let now = breakers.now();
            let mut client_holds: Vec<ClientHoldRow> = breakers
                .client_holds()
                .map(|h| ClientHoldRow::of(h, now, names.as_deref_mut()))
                .collect();
            client_holds.sort_by_key(|h| (h.upstream.ip(), h.upstream.port(), h.client));
            let mut services: Vec<ServiceRow> = breakers
                .services()
                .services()
                .map(|s| ServiceRow::of(breakers, s))
                .collect();
            services.sort_by_key(|s| (s.service.ip(), s.service.port()));
            let breakers = upstreams
                .into_iter()
                .filter_map(|u| row(breakers, u))
                .collect();
            serde_json::to_string(&Status {
                breakers,
                client_holds,
                services,
            })
        }
        Query::Inspect(upstream) => {
            let now = breakers.now();
            let witnesses = breakers
                .get(&upstream)
                .map(|b| b.witnesses())
                .unwrap_or_default()
                .into_iter()
                .map(|w| WitnessRow {
                    client: w.client.0,
                    client_path: names.as_mut().and_then(|n| n.path(w.client.0)),
                    failure_seconds_ago: w.last_failure.map(|t| now.since(t).as_secs_f64()),
                    success_seconds_ago: w.last_success.map(|t| now.since(t).as_secs_f64()),
                })
                .collect();
            let client_holds = breakers
                .client_holds_of(upstream)
                .map(|h| ClientHoldRow::of(h, now, names.as_deref_mut()))
                .collect();
            let inspection = Inspection {
                service: breakers
                    .services()
                    .is_service(&upstream)
                    .then(|| ServiceRow::of(breakers, upstream)),
                behind: breakers.services().services_of(&upstream).to_vec(),
                breaker: row(breakers, upstream),
                witnesses,
                client_holds,
                policy: breakers
                    .policy_of(&upstream)
                    .and_then(|p| serde_json::to_value(AsWritten(p)).ok()),
                recent_transitions: hub.recent(upstream),
                kernel_verdict: verdicts
                    .get(upstream)
                    .ok()
                    .flatten()
                    .map(|v| KernelVerdict::of(&v, now)),
            };
            serde_json::to_string(&inspection)
        }
    };
    let _ = request
        .reply
        .send(json.unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
}

/// No agent answers on the control socket.
#[derive(Debug, thiserror::Error)]
#[error("no agent running: {socket}: {source}")]
pub struct NoAgent {
    pub socket: std::path::PathBuf,
    pub source: std::io::Error,
}

/// Client side: sends one request, returns the reader over the reply lines.
pub async fn request(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>> {
    let request = serde_json::to_string(request).context("cannot encode the request")?;
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                anyhow::Error::new(NoAgent {
                    socket: socket.to_owned(),
                    source: e,
                })
            }
            std::io::ErrorKind::PermissionDenied => {
                anyhow::anyhow!("permission denied (root only): {}: {e}", socket.display())
            }
            _ => anyhow::anyhow!("cannot connect: {}: {e}", socket.display()),
        })?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .context("cannot send the request")?;
    Ok(BufReader::new(read).lines())
}
