//! The `circuit-agent` command line: verb first, one binary for the daemon and its tools.
//!
//! Exit codes: 0 success; 2 bad usage or bad input (clap's own errors, a malformed upstream,
//! an invalid configuration); 1 anything that failed at run time. Errors are one line on
//! stderr.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use circuit_common::OverrideKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

use crate::{
    config::{Config, ConfigError},
    daemon::{self, AgentOptions, ConfigSource, default_socket},
    engine::{BreakerState, Breakers, Clock},
    kernel::{
        self, CgroupNames, Enforcer, OverrideTable, Stats, StoredOverride, StoredVerdict,
        UpstreamCounts, VerdictSpec, VerdictTable, XdpModeChoice,
    },
    surfaces::control::{
        self, ClientHoldRow, Inspection, KernelVerdict, KernelVerdictState, OperatorCommand,
        OperatorReply, Request, Status,
    },
    time::MonotonicClock,
};

#[derive(Debug, Parser)]
#[command(
    name = "circuit-agent",
    version,
    about = "Node-local eBPF circuit breaker"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export spans (one per breaker lifecycle, an event per transition) over OTLP/HTTP to
    /// this endpoint, e.g. http://collector:4318/v1/traces.
    #[cfg(feature = "otlp")]
    #[arg(long, global = true)]
    pub otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs, attach them and run the breakers until SIGINT/SIGTERM.
    Attach(Box<AttachArgs>),
    /// Remove the programs, links and pinned maps an agent left (stop the agent first).
    Detach(PinDirArg),
    /// Show the breakers (from the running agent) or, without one, the kernel's verdicts.
    Status(ReadArgs),
    /// Show one upstream: state, window, policy, recent transitions, kernel verdict.
    Inspect {
        #[arg(value_parser = parse_upstream)]
        upstream: SocketAddr,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Print breaker transitions: the recent ones, or with --follow as they happen.
    Events {
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Isolate an upstream now (FORCED_OPEN), until `reset` or for a duration. Asks the
    /// running agent; with no agent running it fails, unless --offline --for is given.
    Trip {
        #[arg(value_parser = parse_upstream)]
        upstream: SocketAddr,
        /// How long to isolate it (e.g. 10m); without it, until `reset` (held by the agent:
        /// if every agent stops, the isolation ends with its lease).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        #[command(flatten)]
        target: OperatorArgs,
    },
    /// Forget an upstream's breaker state (back to CLOSED) and lift a trip or a disable.
    Reset(UpstreamArg),
    /// Never isolate an upstream (DISABLED) until `enable` or `reset`.
    Disable(UpstreamArg),
    /// Undo `disable` (or end a trip).
    Enable(UpstreamArg),
    /// Validate a configuration file without touching the kernel.
    CheckConfig { file: PathBuf },
    /// Say what works on this kernel, feature by feature; exit 1 if circuit cannot protect
    /// anything here.
    Doctor {
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) on stdout.
    Man,
}

#[derive(Debug, Args)]
pub struct PinDirArg {
    /// bpffs directory holding circuit's pinned maps and links.
    #[arg(long, default_value = kernel::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct UpstreamArg {
    /// IP:PORT, [IPv6]:PORT, or a bare IP for the whole host.
    #[arg(value_parser = parse_upstream)]
    pub upstream: SocketAddr,
    #[command(flatten)]
    pub target: OperatorArgs,
}

/// Where an operator command goes: the running agent, or (explicitly) the kernel's maps.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub pins: PinDirArg,
    /// The agent's control socket (default: derived from --pin-dir).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// No agent is running: write the kernel's maps directly. A trip then needs --for, so
    /// that nothing outlives every agent without an end; the next agent takes it over.
    #[arg(long)]
    pub offline: bool,
    /// With --offline: the agent's configuration, whose never_isolate rules an offline trip
    /// obeys as the agent would (default: the built-in rules, DNS on port 53 everywhere).
    #[arg(long, requires = "offline")]
    pub config: Option<PathBuf>,
}

impl OperatorArgs {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| default_socket(&self.pins.pin_dir))
    }
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub pins: PinDirArg,
    /// The agent's control socket (default: derived from --pin-dir).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ReadArgs {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| default_socket(&self.pins.pin_dir))
    }
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Configuration file (TOML); command-line flags override it. Reloaded on SIGHUP and
    /// when the file changes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Interface for the XDP (ingress) and TC (egress) enforcement points (repeatable).
    #[arg(long = "iface", value_name = "IFACE")]
    pub interfaces: Vec<String>,
    /// Enforcement points, comma-separated: cgroup (connect() of local processes), xdp and
    /// tc (on each --iface). Default: cgroup,xdp.
    #[arg(long = "enforce", value_enum, value_delimiter = ',')]
    pub enforcers: Vec<Enforcer>,
    /// XDP attach mode (default auto).
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeChoice>,
    /// bpffs directory for pinned maps and links (default /sys/fs/bpf/circuit).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz (default 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Also serve /healthz and /readyz, and nothing else, on this address: e.g.
    /// 0.0.0.0:9465 for the kubelet's probes while /metrics, which names upstreams, stays
    /// on loopback.
    #[arg(long)]
    pub health_addr: Option<SocketAddr>,
    /// Control socket for status/inspect/events (default derived from the pin directory).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Per-upstream metric series kept at most (bounds label cardinality).
    #[arg(long, default_value_t = 1_000)]
    pub metrics_upstream_cap: usize,
    /// Consecutive connect failures that open a breaker (0 turns the detector off).
    #[arg(long)]
    pub failure_threshold: Option<u32>,
    /// How long an open breaker rejects new connections before admitting probes.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub open_duration: Option<Duration>,
    /// New connections admitted as probes while half-open.
    #[arg(long)]
    pub half_open_probes: Option<u32>,
    /// Successful probes that close a half-open breaker.
    #[arg(long)]
    pub success_threshold: Option<u32>,
    /// How long an admitted probe may go without an outcome before its token is given back
    /// (the breaker stays half-open: only a failure re-opens it).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub probe_timeout: Option<Duration>,
    /// How long the kernel keeps enforcing a verdict the agent stops renewing.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease: Option<Duration>,
}

impl AttachArgs {
    /// Lays the flags over `config`.
    fn adjust(&self, config: &mut Config) {
        let agent = &mut config.agent;
        if !self.interfaces.is_empty() {
            agent.interfaces = self.interfaces.clone();
        }
        if !self.enforcers.is_empty() {
            agent.enforcement = self.enforcers.clone();
        }
        if let Some(v) = self.xdp_mode {
            agent.xdp_mode = v;
        }
        if let Some(v) = &self.pin_dir {
            agent.pin_dir = v.clone();
        }
        if let Some(v) = self.metrics_addr {
            agent.metrics_address = v;
        }
        if let Some(v) = self.lease {
            agent.lease = v;
        }
        let d = &mut config.engine.defaults;
        if let Some(v) = self.failure_threshold {
            d.failure_threshold = v;
        }
        if let Some(v) = self.open_duration {
            d.open_duration = v;
        }
        if let Some(v) = self.half_open_probes {
            d.half_open_probes = v;
        }
        if let Some(v) = self.success_threshold {
            d.success_threshold = v;
        }
        if let Some(v) = self.probe_timeout {
            d.probe_timeout = v;
        }
    }
}

/// A run-time error that is the user's input, not a failure: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "otlp")]
    let _otlp = match init_logging(cli.log_format, cli.otlp_endpoint.as_deref()) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(not(feature = "otlp"))]
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let bad_input = err.downcast_ref::<BadInput>().is_some()
                || err.downcast_ref::<ConfigError>().is_some();
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

/// The stderr log layer in `format`.
fn log_layer<S>(format: LogFormat) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => Box::new(layer.json().flatten_event(true)),
        LogFormat::Text => {
            Box::new(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
        }
    }
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

#[cfg(not(feature = "otlp"))]
fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(env_filter())
        .with(log_layer(format))
        .init();
}

#[cfg(feature = "otlp")]
fn init_logging(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Option<crate::surfaces::otel::OtlpGuard>> {
    use tracing_subscriber::prelude::*;
    let (otlp, guard) = match otlp_endpoint {
        Some(endpoint) => {
            let (layer, guard) = crate::surfaces::otel::layer(endpoint)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(env_filter())
        .with(log_layer(format))
        .with(otlp)
        .init();
    Ok(guard)
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare IP meaning the whole host (port 0).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
        .map_err(|_| {
            format!("`{s}` is not an upstream: expected IP:PORT, [IPv6]:PORT or an IP (whole host)")
        })
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attach(args) => attach(*args),
        Command::Detach(args) => {
            let removed = kernel::remove_pins(&args.pin_dir)?;
            println!(
                "removed {} pinned object(s) from {}",
                removed.len(),
                args.pin_dir.display()
            );
            Ok(())
        }
        Command::Status(read) => status(&read),
        Command::Inspect { upstream, read } => inspect(upstream, &read),
        Command::Events { follow, read } => events(follow, &read),
        Command::Trip {
            upstream,
            duration,
            target,
        } => {
            let duration_ms = duration.map(|d| d.as_millis().try_into().unwrap_or(u64::MAX));
            operate(
                OperatorCommand::Trip {
                    upstream,
                    duration_ms,
                },
                &target,
            )
        }
        Command::Reset(a) => operate(
            OperatorCommand::Reset {
                upstream: a.upstream,
            },
            &a.target,
        ),
        Command::Disable(a) => operate(
            OperatorCommand::Disable {
                upstream: a.upstream,
            },
            &a.target,
        ),
        Command::Enable(a) => operate(
            OperatorCommand::Enable {
                upstream: a.upstream,
            },
            &a.target,
        ),
        Command::CheckConfig { file } => {
            let config = Config::from_file(&file)?;
            println!(
                "{}: ok ({} group(s), {} override(s))",
                file.display(),
                config.engine.groups.len(),
                config.engine.overrides.len()
            );
            Ok(())
        }
        Command::Doctor { json } => {
            let report = crate::doctor::diagnose()?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", crate::doctor::render(&report));
            }
            if !report.can_protect {
                anyhow::bail!("circuit cannot protect anything on this kernel (see above)");
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "circuit-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("cannot write the man page"),
    }
}

fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    args.adjust(&mut config);
    config.validate()?;
    if config.agent.lease < Duration::from_millis(300) {
        return Err(BadInput(
            "lease must be at least 300ms (it is renewed every third of it)".into(),
        )
        .into());
    }
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| default_socket(&config.agent.pin_dir));
    let upstream_label_cap = args.metrics_upstream_cap;
    let health_address = args.health_addr;
    let source = args.config.clone().map(|path| ConfigSource {
        path,
        adjust: Box::new(move |c: &mut Config| args.adjust(c)),
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?
        .block_on(daemon::run(AgentOptions {
            config,
            source,
            socket,
            upstream_label_cap,
            health_address,
        }))
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

fn secs(s: f64) -> String {
    humantime::format_duration(Duration::from_millis((s.max(0.0) * 1000.0) as u64)).to_string()
}

/// One request to the running agent; the first reply line. Err when no agent answers.
fn ask_agent(socket: &Path, request: Request) -> anyhow::Result<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut lines = control::request(socket, &request).await?;
            lines
                .next_line()
                .await?
                .context("the agent closed the connection without answering")
        })
}

/// The kernel's view, from the pinned maps: works with no agent running.
#[derive(Serialize)]
struct KernelView {
    verdicts: Vec<VerdictRow>,
    /// Client-scoped verdicts: one client failed fast at one upstream, by the cgroup hook.
    client_verdicts: Vec<ClientHoldRow>,
    overrides: Vec<OverrideRow>,
    counters: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct VerdictRow {
    upstream: SocketAddr,
    #[serde(flatten)]
    verdict: KernelVerdict,
}

#[derive(Serialize)]
struct OverrideRow {
    upstream: SocketAddr,
    kind: &'static str,
    seconds_left: Option<f64>,
}

fn override_name(kind: OverrideKind) -> &'static str {
    match kind {
        OverrideKind::ForcedOpen => "FORCED_OPEN",
        OverrideKind::Disabled => "DISABLED",
        OverrideKind::Reset => "RESET (pending)",
    }
}

fn kernel_view(pin_dir: &Path) -> anyhow::Result<KernelView> {
    let now = MonotonicClock.now();
    let table = VerdictTable::open_pinned(pin_dir)?;
    let mut names = kernel::ensure_cgroup2_root().ok().map(CgroupNames::new);
    let client_verdicts = table
        .list_clients()?
        .into_iter()
        .map(|v| ClientHoldRow {
            upstream: v.upstream,
            client: v.client,
            client_path: names.as_mut().and_then(|n| n.path(v.client)),
            seconds_left: v.lease_expires.since(now).as_secs_f64(),
            dry_run: v.dry_run,
        })
        .collect();
    let verdicts = table
        .list()?
        .iter()
        .map(|v: &StoredVerdict| VerdictRow {
            upstream: v.upstream,
            verdict: KernelVerdict::of(v, now),
        })
        .collect();
    let overrides = OverrideTable::open_pinned(pin_dir)?
        .list()?
        .into_iter()
        .map(|o: StoredOverride| OverrideRow {
            upstream: o.upstream,
            kind: override_name(o.kind),
            seconds_left: o.until.map(|u| u.since(now).as_secs_f64()),
        })
        .collect();
    let counters = Stats::open_pinned(pin_dir)?
        .all()?
        .into_iter()
        .map(|(s, v)| (s.name(), v))
        .collect();
    Ok(KernelView {
        verdicts,
        client_verdicts,
        overrides,
        counters,
    })
}

#[derive(Serialize)]
struct StatusJson {
    /// "agent" when a running agent answered, "kernel" when read from the pins alone.
    source: &'static str,
    breakers: Vec<control::BreakerRow>,
    /// Clients failed fast on their own, as the agent holds them (empty without an agent;
    /// `client_verdicts` is the kernel's side).
    client_holds: Vec<ClientHoldRow>,
    #[serde(flatten)]
    kernel: KernelView,
}

fn status(read: &ReadArgs) -> anyhow::Result<()> {
    let kernel = kernel_view(&read.pins.pin_dir)?;
    let agent = ask_agent(&read.socket(), Request::Status);
    let (source, status) = match agent {
        Ok(line) => ("agent", serde_json::from_str::<Status>(&line)?),
        Err(err) => {
            tracing::debug!(%err, "no agent answered; showing the kernel's view");
            let none = Status {
                breakers: Vec::new(),
                client_holds: Vec::new(),
            };
            ("kernel", none)
        }
    };
    let out = StatusJson {
        source,
        breakers: status.breakers,
        client_holds: status.client_holds,
        kernel,
    };
    if read.output == Output::Json {
        return print_json(&out);
    }
    if source == "agent" {
        let mut t = table(&[
            "UPSTREAM",
            "STATE",
            "FAIL RATE",
            "FAILS/CALLS",
            "SINCE",
            "NEXT PROBE",
            "REJECTS",
        ]);
        for b in &out.breakers {
            t.add_row(vec![
                b.upstream.to_string(),
                b.state.to_string(),
                b.failure_rate
                    .map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
                match (b.window_failures, b.window_calls) {
                    (Some(f), Some(c)) => format!("{f}/{c}"),
                    _ => format!("{} in a row", b.consecutive_failures),
                },
                secs(b.since_seconds),
                b.next_probe_seconds.map_or("-".into(), secs),
                b.rejects.to_string(),
            ]);
        }
        println!("{t}");
    } else {
        println!(
            "(no agent answered on {}: kernel view only)",
            read.socket().display()
        );
    }
    let mut t = table(&["UPSTREAM", "VERDICT", "PROBES", "LEASE LEFT"]);
    for v in &out.kernel.verdicts {
        let k = &v.verdict;
        let mut state = if k.state == KernelVerdictState::Partial {
            format!("PARTIAL {:.0}%", k.reject_fraction * 100.0)
        } else {
            k.state.as_str().to_owned()
        };
        if k.dry_run {
            state.push_str(" (dry run)");
        }
        let probes = if k.state == KernelVerdictState::HalfOpen {
            format!(
                "{}/{}",
                k.probes_admitted.min(u64::from(k.probe_budget)),
                k.probe_budget
            )
        } else {
            "-".into()
        };
        let left = if k.lease_left_seconds > 0.0 {
            secs(k.lease_left_seconds)
        } else {
            "expired".into()
        };
        t.add_row(vec![v.upstream.to_string(), state, probes, left]);
    }
    println!("\nkernel verdicts (node-wide):\n{t}");
    if !out.kernel.client_verdicts.is_empty() {
        let mut t = table(&["UPSTREAM", "CLIENT", "CGROUP", "LEASE LEFT"]);
        for h in &out.kernel.client_verdicts {
            let mut left = secs(h.seconds_left);
            if h.dry_run {
                left.push_str(" (dry run)");
            }
            t.add_row(vec![
                h.upstream.to_string(),
                h.client.to_string(),
                h.client_path.clone().unwrap_or_else(|| "?".into()),
                left,
            ]);
        }
        println!("\nclient-scoped verdicts (that client alone fails fast):\n{t}");
    }
    if !out.kernel.overrides.is_empty() {
        let mut t = table(&["UPSTREAM", "OVERRIDE", "TIME LEFT"]);
        for o in &out.kernel.overrides {
            t.add_row(vec![
                o.upstream.to_string(),
                o.kind.to_owned(),
                o.seconds_left.map_or("until reset".into(), secs),
            ]);
        }
        println!("\noperator overrides:\n{t}");
    }
    let mut t = table(&["COUNTER", "VALUE"]);
    for (name, value) in &out.kernel.counters {
        t.add_row(vec![name.to_string(), value.to_string()]);
    }
    println!("\nkernel counters:\n{t}");
    Ok(())
}

#[derive(Serialize)]
struct InspectJson {
    source: &'static str,
    upstream: SocketAddr,
    #[serde(flatten)]
    agent: Option<Inspection>,
    kernel_verdict: Option<KernelVerdict>,
    /// The kernel's outcome counters for this upstream (complete even if events were lost).
    kernel_counts: std::collections::BTreeMap<&'static str, u64>,
}

fn inspect(upstream: SocketAddr, read: &ReadArgs) -> anyhow::Result<()> {
    let now = MonotonicClock.now();
    let kernel_verdict = VerdictTable::open_pinned(&read.pins.pin_dir)?
        .get(upstream)?
        .map(|v| KernelVerdict::of(&v, now));
    let kernel_counts: std::collections::BTreeMap<&str, u64> =
        UpstreamCounts::open_pinned(&read.pins.pin_dir)?
            .get(upstream)?
            .into_iter()
            .map(|(o, n)| (crate::engine::outcome_name(o), n))
            .collect();
    let agent = ask_agent(&read.socket(), Request::Inspect { upstream })
        .ok()
        .map(|line| serde_json::from_str::<Inspection>(&line))
        .transpose()?;
    if agent.as_ref().is_some_and(|a| a.breaker.is_none())
        && kernel_verdict.is_none()
        && kernel_counts.values().all(|n: &u64| *n == 0)
    {
        return Err(BadInput(format!(
            "unknown upstream {upstream}: no breaker, verdict or outcome"
        ))
        .into());
    }
    let out = InspectJson {
        source: if agent.is_some() { "agent" } else { "kernel" },
        upstream,
        agent,
        kernel_verdict,
        kernel_counts,
    };
    if read.output == Output::Json {
        return print_json(&out);
    }
    println!("upstream: {upstream}  (source: {})", out.source);
    if let Some(a) = &out.agent {
        if let Some(b) = &a.breaker {
            println!("state: {} for {}", b.state, secs(b.since_seconds));
            if let Some(g) = &b.group {
                println!("group: {g}");
            }
            match (b.window_failures, b.window_calls) {
                (Some(f), Some(c)) => println!("window: {f} failures in {c} calls"),
                _ => println!("consecutive failures: {}", b.consecutive_failures),
            }
            if let Some(n) = b.next_probe_seconds {
                println!("next probe in: {}", secs(n));
            }
        }
        if let Some(p) = &a.policy {
            println!("policy: {p}");
        }
        if !a.witnesses.is_empty() {
            println!("clients lately (witnesses):");
            for w in &a.witnesses {
                let ago = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{} ago", secs(s)));
                println!(
                    "  {} {}: last failure {}, last success {}",
                    w.client,
                    w.client_path.as_deref().unwrap_or("?"),
                    ago(w.failure_seconds_ago),
                    ago(w.success_seconds_ago)
                );
            }
        }
        for h in &a.client_holds {
            println!(
                "client held on its own: {} {} for {}",
                h.client,
                h.client_path.as_deref().unwrap_or("?"),
                secs(h.seconds_left)
            );
        }
        if !a.recent_transitions.is_empty() {
            println!("recent transitions:");
            for e in &a.recent_transitions {
                let scope = match (&e.client_path, e.client) {
                    (Some(path), _) => format!(" (client {path})"),
                    (None, Some(id)) => format!(" (client {id})"),
                    (None, None) => String::new(),
                };
                println!("  {} → {}{scope}: {}", e.from, e.to, e.reason);
            }
        }
    }
    match &out.kernel_verdict {
        Some(k) => println!(
            "kernel verdict: {} (probes {}/{}, lease {})",
            k.state,
            k.probes_admitted,
            k.probe_budget,
            secs(k.lease_left_seconds)
        ),
        None => println!("kernel verdict: none (admitting)"),
    }
    let counts: Vec<String> = out
        .kernel_counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("kernel counters: {}", counts.join(" "));
    Ok(())
}

fn events(follow: bool, read: &ReadArgs) -> anyhow::Result<()> {
    let socket = read.socket();
    let request = if follow {
        Request::Events
    } else {
        Request::Recent
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut lines = control::request(&socket, &request).await?;
            let mut stdout = std::io::stdout();
            while let Some(line) = lines.next_line().await? {
                if read.output == Output::Json {
                    writeln!(stdout, "{line}")?;
                } else if let Ok(e) = serde_json::from_str::<control::Event>(&line) {
                    writeln!(
                        stdout,
                        "{}  {}  {} → {}  {}",
                        secs(e.at_seconds),
                        e.upstream,
                        e.from,
                        e.to,
                        e.reason
                    )?;
                }
                stdout.flush()?;
            }
            Ok(())
        })
}

/// An operator command refused by the agent (never-isolate list, capacity...).
#[derive(Debug, thiserror::Error)]
#[error("{upstream}: not applied: {message}")]
struct Refused {
    upstream: SocketAddr,
    message: String,
}

/// Sends an operator command to the running agent, the only writer of kernel verdicts.
fn operate(command: OperatorCommand, target: &OperatorArgs) -> anyhow::Result<()> {
    let socket = target.socket();
    if target.offline {
        return operate_offline(command, target, &socket);
    }
    let line = ask_agent(&socket, Request::Operator(command)).map_err(|err| {
        if err.downcast_ref::<control::NoAgent>().is_none() {
            return err;
        }
        let hint = match command {
            OperatorCommand::Trip { .. } => "--offline --for DURATION",
            _ => "--offline",
        };
        anyhow::anyhow!(
            "no agent running (nothing answers on {}): start `circuit-agent attach`, or act on the kernel's maps directly with {hint}",
            socket.display()
        )
    })?;
    let reply: OperatorReply = serde_json::from_str(&line)
        .with_context(|| format!("unexpected answer from the agent: {line}"))?;
    if !reply.applied {
        return Err(Refused {
            upstream: reply.upstream,
            message: reply.message,
        }
        .into());
    }
    println!(
        "{}: {} ({})",
        reply.upstream,
        reply.state.unwrap_or(BreakerState::Closed),
        reply.message
    );
    Ok(())
}

/// Writes an operator command into the kernel's maps with no agent running. The next agent
/// restores it from the OVERRIDES record; a trip carries its own end, as the verdict's lease.
fn operate_offline(
    command: OperatorCommand,
    target: &OperatorArgs,
    socket: &Path,
) -> anyhow::Result<()> {
    if ask_agent(socket, Request::Status).is_ok() {
        return Err(BadInput(format!(
            "an agent is running (it answers on {}): drop --offline, it alone writes verdicts",
            socket.display()
        ))
        .into());
    }
    let pin_dir = &target.pins.pin_dir;
    // The agent's own lock on its pins: held, an agent runs (whatever socket it answers
    // on), and held here, no agent starts while this writes. One writer at a time.
    let _lock = match crate::lock::ExclusiveLock::directory(pin_dir, "a running circuit agent") {
        Ok(lock) => lock,
        Err(err) if err.downcast_ref::<crate::lock::LockHeld>().is_some() => {
            return Err(BadInput(format!(
                "an agent holds {}: drop --offline, it alone writes verdicts",
                pin_dir.display()
            ))
            .into());
        }
        Err(err) => return Err(err),
    };
    let now = MonotonicClock.now();
    let upstream = command.upstream();
    let mut overrides = OverrideTable::open_pinned(pin_dir)?;
    let mut verdicts = VerdictTable::open_pinned(pin_dir)?;
    match command {
        OperatorCommand::Trip {
            duration_ms: None, ..
        } => {
            return Err(BadInput(
                "--offline needs --for DURATION: with no agent to hold it, a trip must end by itself"
                    .into(),
            )
            .into());
        }
        OperatorCommand::Trip {
            duration_ms: Some(ms),
            ..
        } => {
            let until = now.saturating_add(Duration::from_millis(ms));
            // The agent's own rules: never-isolated upstreams are refused, and a whole
            // host's never-isolated ports are spared before its verdict is written.
            let config = match &target.config {
                Some(path) => Config::from_file(path)?,
                None => Config::default(),
            };
            let mut rules = Breakers::with_config(&config.engine, MonotonicClock)?;
            rules
                .force_open_until(upstream, Some(until))
                .map_err(|err| BadInput(err.to_string()))?;
            // Other isolated hosts keep theirs: `spare` never drops a live host's ports.
            verdicts.spare(&rules.spared())?;
            overrides.set(upstream, OverrideKind::ForcedOpen, Some(until), now)?;
            verdicts.set(upstream, VerdictSpec::reject(), until)?;
            println!(
                "{upstream}: FORCED_OPEN for {} (offline: written to the kernel)",
                humantime::format_duration(Duration::from_millis(ms))
            );
        }
        OperatorCommand::Disable { .. } => {
            overrides.set(upstream, OverrideKind::Disabled, None, now)?;
            verdicts.clear(upstream)?;
            unspare_host(&mut verdicts, upstream)?;
            println!("{upstream}: DISABLED (offline: the next agent keeps it disabled)");
        }
        OperatorCommand::Reset { .. } | OperatorCommand::Enable { .. } => {
            overrides.remove(upstream)?;
            verdicts.clear(upstream)?;
            unspare_host(&mut verdicts, upstream)?;
            println!("{upstream}: CLOSED (offline: verdict and operator record removed)");
        }
    }
    Ok(())
}

/// With a whole host's verdict gone, its spared ports go too (those of hosts still isolated
/// stay: see [`VerdictTable::spare`]).
fn unspare_host(verdicts: &mut VerdictTable, upstream: SocketAddr) -> anyhow::Result<()> {
    if upstream.port() != 0 {
        return Ok(());
    }
    verdicts.spare(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse_with_a_port_or_as_a_whole_host() {
        assert_eq!(
            parse_upstream("10.0.0.1:80"),
            Ok("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("[fd00::1]:443"),
            Ok("[fd00::1]:443".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("10.0.0.1"),
            Ok("10.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("fd00::1"),
            Ok("[fd00::1]:0".parse().unwrap())
        );
        for bad in ["", "10.0.0.1:", "host:80", "10.0.0.300:1", "[fd00::1]"] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file() {
        let args = AttachArgs::parse_from_args(&[
            "--iface",
            "eth9",
            "--failure-threshold",
            "9",
            "--enforce",
            "tc",
        ]);
        let mut config = Config::default();
        args.adjust(&mut config);
        assert_eq!(config.agent.interfaces, vec!["eth9".to_owned()]);
        assert_eq!(config.agent.enforcement, vec![Enforcer::Tc]);
        assert_eq!(config.engine.defaults.failure_threshold, 9);
        assert_eq!(
            config.engine.defaults.open_duration,
            Config::default().engine.defaults.open_duration
        );
    }

    impl AttachArgs {
        fn parse_from_args(args: &[&str]) -> Self {
            let mut argv = vec!["circuit-agent", "attach"];
            argv.extend(args);
            match Cli::parse_from(argv).command {
                Command::Attach(a) => *a,
                _ => unreachable!(),
            }
        }
    }
}
