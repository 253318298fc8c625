//! The `circuit-agent` command line: verb first, one binary for the daemon and its tools.
//!
//! Exit codes: 0 success; 2 bad usage or bad input (clap's own errors, a malformed upstream,
//! an invalid configuration); 1 anything that failed at run time. Errors are one line on
//! stderr.

mod operate;
mod read;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use self::{
    operate::operate,
    read::{events, inspect, print_json, status},
};
use crate::{
    config::{Config, ConfigError},
    daemon::{self, AgentOptions, ConfigSource, default_socket},
    kernel::{self, Enforcer, XdpModeChoice},
    surfaces::control::OperatorCommand,
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
pub(crate) struct BadInput(String);

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
