//! The `circuit-agent` command line: verb first, one binary for the daemon and its tools.
//! Usage errors exit with 2 (clap), runtime errors with 1 and one line on stderr.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use circuit_common::VerdictState;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{
    daemon::{self, AgentOptions},
    engine::{BreakerPolicy, Clock, MonotonicClock},
    kernel::{self, DataplaneOptions, Enforcer, Stats, VerdictTable, XdpModeChoice},
};

#[derive(Debug, Parser)]
#[command(
    name = "circuit-agent",
    version,
    about = "Node-local eBPF circuit breaker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs, attach them and run the breakers until SIGINT/SIGTERM.
    Attach(AttachArgs),
    /// Remove the pinned maps an agent left (run it after stopping the agent).
    Detach(PinDirArg),
    /// Show the verdicts the kernel enforces and the dataplane counters.
    Status(PinDirArg),
}

#[derive(Debug, Args)]
pub struct PinDirArg {
    /// bpffs directory holding circuit's pinned maps.
    #[arg(long, default_value = kernel::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Interface for the XDP (ingress) and TC (egress) enforcement points (repeatable).
    #[arg(long = "iface", value_name = "IFACE")]
    pub interfaces: Vec<String>,
    /// Enforcement points, comma-separated: cgroup (connect() of local processes), xdp and
    /// tc (on each --iface).
    #[arg(
        long = "enforce",
        value_enum,
        value_delimiter = ',',
        default_value = "cgroup,xdp"
    )]
    pub enforcers: Vec<Enforcer>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
    pub xdp_mode: XdpModeChoice,
    #[command(flatten)]
    pub pins: PinDirArg,
    /// Consecutive connect failures that open a breaker.
    #[arg(long, default_value_t = BreakerPolicy::default().failure_threshold)]
    pub failure_threshold: u32,
    /// How long an open breaker rejects new connections before admitting probes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub open_duration: Duration,
    /// New connections admitted as probes while half-open.
    #[arg(long, default_value_t = BreakerPolicy::default().half_open_probes)]
    pub half_open_probes: u32,
    /// Successful probes that close a half-open breaker.
    #[arg(long, default_value_t = BreakerPolicy::default().success_threshold)]
    pub success_threshold: u32,
    /// How long a half-open breaker waits for its probes before opening again.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub half_open_max_wait: Duration,
    /// How long the kernel keeps enforcing a verdict the agent stops renewing.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    pub lease: Duration,
}

impl AttachArgs {
    fn agent_options(&self) -> anyhow::Result<AgentOptions> {
        let policy = BreakerPolicy {
            failure_threshold: self.failure_threshold,
            open_duration: self.open_duration,
            half_open_probes: self.half_open_probes,
            success_threshold: self.success_threshold,
            half_open_max_wait: self.half_open_max_wait,
        };
        policy.validate()?;
        if self.lease < Duration::from_millis(300) {
            anyhow::bail!("--lease must be at least 300ms (it is renewed every third of it)");
        }
        Ok(AgentOptions {
            dataplane: DataplaneOptions {
                pin_dir: self.pins.pin_dir.clone(),
                interfaces: self.interfaces.clone(),
                xdp_mode: self.xdp_mode,
                enforcers: self.enforcers.clone(),
            },
            policy,
            lease: self.lease,
        })
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attach(args) => {
            let options = args.agent_options()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?
                .block_on(daemon::run(options))
        }
        Command::Detach(args) => {
            let removed = kernel::remove_pins(&args.pin_dir)?;
            println!(
                "removed {} pinned object(s) from {}",
                removed.len(),
                args.pin_dir.display()
            );
            Ok(())
        }
        Command::Status(args) => status(&args),
    }
}

fn status(args: &PinDirArg) -> anyhow::Result<()> {
    let verdicts = VerdictTable::open_pinned(&args.pin_dir)?.list()?;
    let now = MonotonicClock.now();
    println!(
        "{:<45} {:<22} {:>8} {:>12}",
        "UPSTREAM", "VERDICT", "PROBES", "LEASE LEFT"
    );
    for v in &verdicts {
        let (state, probes) = match v.state {
            VerdictState::Open => ("OPEN".to_owned(), "-".to_owned()),
            VerdictState::HalfOpen => (
                "HALF_OPEN".to_owned(),
                format!(
                    "{}/{}",
                    v.probes_admitted.min(u64::from(v.probe_budget)),
                    v.probe_budget
                ),
            ),
            VerdictState::Partial => (
                format!("PARTIAL {:.0}%", f64::from(v.reject_fraction) / 655.36),
                "-".to_owned(),
            ),
        };
        let state = if v.dry_run {
            format!("{state} (dry run)")
        } else {
            state
        };
        let left = if v.lease_expires > now {
            let d = v.lease_expires.since(now);
            humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
        } else {
            "expired".to_owned()
        };
        println!(
            "{:<45} {:<10} {:>8} {:>12}",
            v.upstream, state, probes, left
        );
    }
    if verdicts.is_empty() {
        println!("(no upstream isolated)");
    }
    let stats = Stats::open_pinned(&args.pin_dir)?;
    println!();
    for (stat, value) in stats.all()? {
        println!("{:<22} {value}", stat.name());
    }
    Ok(())
}
