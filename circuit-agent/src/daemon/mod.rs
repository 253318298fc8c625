//! `circuit-agent attach`: the daemon that joins the engine to the kernel.
//!
//! One task owns all state: it sleeps until the kernel submits outcomes, a breaker timer is
//! due, leases need renewing, a control request arrives (status, operator commands), the
//! config file is due a check, or a signal arrives, so no locks guard the engine and nothing
//! polls the ring buffer. The agent is the only writer of kernel verdicts: operator commands
//! reach it over the control socket.

mod agent;
#[cfg(test)]
mod memory;
mod operator;
mod sync;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use self::{
    agent::{Agent, ReloadOutcome},
    operator::Operator,
    sync::VerdictSync,
};
use crate::{
    config::Config,
    engine::{Breakers, Clock, Decision, Enforcement, EvictionCause, Notice},
    kernel::{
        CgroupNames, Dataplane, DataplaneOptions, ExemptCgroups, OverrideTable, VerdictSpec,
        ensure_cgroup2_root,
    },
    ports::{OverrideStore, VerdictStore},
    surfaces::{
        control::{self, EventHub},
        http::{self, Health},
        metrics::Metrics,
    },
    time::MonotonicClock,
};

/// How often the config file is checked for changes.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// Where the configuration comes from, so it can be read again on reload.
pub struct ConfigSource {
    pub path: PathBuf,
    /// Re-applies the command-line flags, which take precedence over the file.
    pub adjust: Box<dyn Fn(&mut Config) + Send>,
}

impl ConfigSource {
    /// The configuration in `text` (read from `path`), with the flags applied.
    fn parse(&self, text: &str) -> anyhow::Result<Config> {
        let mut config = Config::from_str_named(text, &self.path.display().to_string())?;
        (self.adjust)(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// Reads the file on a blocking thread: the event loop keeps turning (leases, health,
    /// signals) whatever the file is or whatever its filesystem does.
    fn read(&self) -> ConfigRead {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || Config::read_text(&path))
    }

    /// A fingerprint of the file that changes when it is rewritten or replaced.
    fn fingerprint(&self) -> Option<(SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    }
}

pub struct AgentOptions {
    pub config: Config,
    /// None when the agent runs on defaults and flags only.
    pub source: Option<ConfigSource>,
    /// The Unix socket of the local control API.
    pub socket: PathBuf,
    /// Per-upstream metric series kept at most.
    pub upstream_label_cap: usize,
    /// Where /healthz and /readyz are also served, without /metrics.
    pub health_address: Option<SocketAddr>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let AgentOptions {
        mut config,
        source,
        socket,
        upstream_label_cap,
        health_address,
    } = options;
    let breakers =
        Breakers::with_config(&config.engine, MonotonicClock).context("invalid configuration")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

    // The socket first: a second agent on it stops here, before it touches the kernel.
    let events = EventHub::default();
    let (_socket, mut requests) = control::serve(&socket, events.clone())?;
    let agent_config = config.agent.clone();
    let pin_dir = agent_config.pin_dir.clone();
    let mut dataplane = Dataplane::attach(&DataplaneOptions {
        pin_dir: pin_dir.clone(),
        interfaces: agent_config.interfaces.clone(),
        xdp_mode: agent_config.xdp_mode,
        enforcers: agent_config.enforcement.clone(),
    })?;
    let mut outcomes = dataplane
        .take_outcomes()
        .context("outcome stream already taken")?;
    let mut kernel_log = dataplane.take_log().context("kernel log already taken")?;
    let metrics = Arc::new(Metrics::new(
        Some(crate::kernel::Stats::open_pinned(&pin_dir)?),
        upstream_label_cap,
    ));
    let mut exempt = ExemptCgroups::open_pinned(&pin_dir)?;
    set_priority_cgroups(&mut exempt, &config, &metrics)?;
    let health = Arc::new(Health::new(pin_dir.clone()));
    http::serve(
        agent_config.metrics_address,
        Some(metrics.clone()),
        health.clone(),
    )
    .await?;
    if let Some(addr) = health_address {
        http::serve(addr, None, health.clone()).await?;
    }

    let mut agent = Agent {
        breakers,
        sync: VerdictSync {
            table: &mut dataplane.verdicts,
            lease: agent_config.lease,
            metrics: &metrics,
            events: &events,
            lifecycles: HashMap::new(),
            routes: Default::default(),
            names: ensure_cgroup2_root().ok().map(CgroupNames::new),
        },
        operator: Operator {
            table: OverrideTable::open_pinned(&pin_dir)?,
        },
    };
    agent.start()?;
    health.set_attached();
    // Before "ready": a file written after that line must count as a change.
    let mut fingerprint = source.as_ref().and_then(ConfigSource::fingerprint);
    info!(
        pin_dir = %pin_dir.display(),
        enforcing = %dataplane.attached.join(", "),
        config = %source.as_ref().map_or("defaults and flags".to_owned(), |s| s.path.display().to_string()),
        metrics = %agent_config.metrics_address,
        socket = %socket.display(),
        failure_threshold = config.engine.defaults.failure_threshold,
        open_duration = %humantime::format_duration(config.engine.defaults.open_duration),
        half_open_probes = config.engine.defaults.half_open_probes,
        lease = %humantime::format_duration(agent_config.lease),
        "circuit-agent ready"
    );

    let mut renew = tokio::time::interval(config.agent.lease / 3);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    let mut batch = Vec::new();
    // A configuration file being read, off the loop.
    let mut reading = None;
    let mut churn = ChurnReport::default();
    loop {
        health.turned(agent.breakers.now());
        let timer = sleep_until(&agent.breakers);
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sighup.recv() => {
                info!("SIGHUP received: reloading the configuration");
                if let Some(source) = &source {
                    // Only a read that starts takes the file as it is now: one under way
                    // may predate a change, which the next check then still sees.
                    let now = source.fingerprint();
                    if start_reading(source, &mut reading) {
                        fingerprint = now;
                    }
                } else {
                    warn!("no --config file to reload");
                }
            }
            read = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                reading = None;
                let text = read.context("the configuration reader panicked")?;
                let source = source.as_ref().expect("only a source is read");
                reload(source, text, &mut config, &mut agent, &mut exempt, &metrics)?;
            }
            read = outcomes.next_batch(&mut batch) => {
                let undecodable = read?;
                if undecodable > 0 {
                    warn!(undecodable, "outcome records with an unknown layout were skipped");
                }
                agent.on_outcomes(batch.drain(..))?;
            }
            _ = timer => agent.on_timer()?,
            _ = renew.tick() => agent.on_renew()?,
            forwarded = kernel_log.forward() => forwarded?,
            _ = housekeeping.tick() => {
                refresh_priority_cgroups(&mut exempt, &metrics);
                let engine = metrics.engine_stats(&agent.breakers.stats());
                metrics.engine_state(&agent.breakers);
                churn.add(&engine);
                if let Some((evicted, refused)) = churn.report() {
                    warn!(
                        evicted,
                        refused,
                        max_upstreams = config.engine.tracking.max_upstreams,
                        "tracking bound reached: CLOSED breakers evicted for room (failure-free ones first), and clients over their eviction budget left untracked"
                    );
                }
                if let Some(source) = &source {
                    let now = source.fingerprint();
                    // While a read is under way the change waits: the next tick sees it.
                    if now != fingerprint && reading.is_none() {
                        fingerprint = now;
                        info!(path = %source.path.display(), "configuration file changed: reloading");
                        start_reading(source, &mut reading);
                    }
                }
            }
            Some(request) = requests.recv() => agent.on_request(request),
        }
    }
    info!(
        "leaving protection in place: links and maps stay pinned, verdicts hold until their leases end"
    );
    Ok(())
}

/// Evictions for room, reported at most every [`ChurnReport::EVERY`] while they go on.
#[derive(Default)]
struct ChurnReport {
    evicted: u64,
    refused: u64,
    reported_at: Option<std::time::Instant>,
}

impl ChurnReport {
    const EVERY: Duration = Duration::from_secs(10);

    fn add(&mut self, since: &crate::engine::ManagerStats) {
        self.evicted += since.evicted_for_room;
        self.refused += since.evictions_refused;
    }

    /// The counts to report now, if any and if the last report is old enough.
    fn report(&mut self) -> Option<(u64, u64)> {
        if self.evicted + self.refused == 0
            || self
                .reported_at
                .is_some_and(|at| at.elapsed() < Self::EVERY)
        {
            return None;
        }
        self.reported_at = Some(std::time::Instant::now());
        Some((
            std::mem::take(&mut self.evicted),
            std::mem::take(&mut self.refused),
        ))
    }
}

type ConfigRead = tokio::task::JoinHandle<Result<String, crate::config::ConfigError>>;

/// Starts reading the configuration file, unless a read is still under way (a file that
/// takes that long to read is not read twice at once); true when a read started.
fn start_reading(source: &ConfigSource, reading: &mut Option<ConfigRead>) -> bool {
    if reading.is_some() {
        warn!(path = %source.path.display(), "the configuration is still being read: send SIGHUP again once it is");
        return false;
    }
    *reading = Some(source.read());
    true
}

/// Applies the configuration read again; an invalid one is rejected and the running one
/// kept.
fn reload<C: Clock, V: VerdictStore, O: OverrideStore>(
    source: &ConfigSource,
    text: Result<String, crate::config::ConfigError>,
    config: &mut Config,
    agent: &mut Agent<'_, C, V, O>,
    exempt: &mut ExemptCgroups,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let mut new = match text
        .map_err(anyhow::Error::from)
        .and_then(|t| source.parse(&t))
    {
        Ok(new) => new,
        Err(err) => {
            error!(error = %format!("{err:#}"), "configuration rejected; the running configuration stays");
            return Ok(());
        }
    };
    // `config` holds what is in force: the [agent] section only applies at start, so it
    // stays, and every later reload that still differs warns again.
    if new.agent != config.agent {
        warn!(
            "the [agent] section changed (interfaces, enforcement, pins, lease, metrics address): restart the agent to apply it; the rest is applied now"
        );
        new.agent = config.agent.clone();
    }
    // All or nothing: the priority cgroups (the part that can fail in the kernel) first,
    // then the policies, which the validation above makes sure the engine takes.
    let restore_priority = |exempt: &mut ExemptCgroups| {
        if let Err(err) = set_priority_cgroups(exempt, config, metrics) {
            error!(error = %format!("{err:#}"), "the running priority cgroups could not be restored");
        }
    };
    if let Err(err) = set_priority_cgroups(exempt, &new, metrics) {
        error!(error = %format!("{err:#}"), "configuration rejected: its priority cgroups cannot be applied; the running configuration stays");
        restore_priority(exempt);
        return Ok(());
    }
    match agent.on_reload(&new.engine)? {
        ReloadOutcome::Applied => *config = new,
        ReloadOutcome::Rejected(err) => {
            error!(error = %err, "configuration rejected; the running configuration stays");
            restore_priority(exempt);
        }
    }
    Ok(())
}

/// Exempts the configured priority cgroups (paths in the cgroup v2 tree) from rejection.
/// A path with no cgroup (yet) is a warning: it is exempt once it appears.
fn set_priority_cgroups(
    exempt: &mut ExemptCgroups,
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let paths: Vec<PathBuf> = if config.priority.cgroups.is_empty() {
        Vec::new()
    } else {
        let root = ensure_cgroup2_root()?;
        config
            .priority
            .cgroups
            .iter()
            .map(|p| root.join(p.trim_start_matches('/')))
            .collect()
    };
    let priority = exempt.configure(&paths)?;
    for cgroup in priority {
        match cgroup.id {
            Some(id) => {
                info!(cgroup = %cgroup.path.display(), id, "priority client exempt from rejection")
            }
            None => {
                warn!(cgroup = %cgroup.path.display(), "priority cgroup not found: exempt once it exists")
            }
        }
    }
    metrics.set_priority_cgroups(priority);
    Ok(())
}

/// Follows the priority cgroups to their current ids (a restarted service's cgroup is a
/// new one at the same path).
fn refresh_priority_cgroups(exempt: &mut ExemptCgroups, metrics: &Metrics) {
    match exempt.refresh() {
        Ok(changed) => {
            for cgroup in &changed {
                match cgroup.id {
                    Some(id) => {
                        info!(cgroup = %cgroup.path.display(), id, "priority cgroup (re)created: exempt under its new id")
                    }
                    None => {
                        warn!(cgroup = %cgroup.path.display(), "priority cgroup gone: exempt again once it exists")
                    }
                }
            }
            if !changed.is_empty() {
                metrics.set_priority_cgroups(exempt.priority());
            }
        }
        Err(err) => error!(error = %format!("{err:#}"), "cannot update the priority cgroups"),
    }
}

/// Logs the engine's notices; an evicted upstream's metric series go with its breaker.
/// Returns the addresses that turned out to be services' virtual addresses: their own
/// verdicts must go.
fn log_notices<C: Clock>(breakers: &mut Breakers<C>, metrics: &Metrics) -> Vec<SocketAddr> {
    let notices: Vec<Notice> = breakers.drain_notices().collect();
    let mut became_services = Vec::new();
    for notice in notices {
        if let Notice::Evicted {
            upstream,
            cause: EvictionCause::BecameService,
        } = notice
        {
            info!(%upstream, "a service's virtual address: its endpoints have the breakers now, its own is dropped");
            became_services.push(upstream);
        }
        match notice {
            // Unless a later outcome of the same batch brought it back.
            Notice::Evicted { upstream, .. } if breakers.get(&upstream).is_none() => {
                metrics.forget(upstream)
            }
            Notice::Evicted { .. } => {}
            Notice::Suppressed(s) => warn!(suppressed = %s, "trip suppressed"),
            Notice::EndpointLearned { service, endpoint } => {
                info!(%service, %endpoint, "service endpoint learned from its NAT")
            }
            Notice::EndpointForgotten { service, endpoint } => {
                info!(%service, %endpoint, "service endpoint forgotten: idle")
            }
            Notice::Saturated {
                upstream, tracked, ..
            } => warn!(
                %upstream,
                tracked,
                "tracking bound reached and every tracked breaker is held: new upstreams are ignored"
            ),
        }
    }
    became_services
}

/// Sleeps until the engine's next deadline (forever when there is none).
async fn sleep_until<C: Clock>(breakers: &Breakers<C>) {
    match breakers.next_deadline() {
        Some(deadline) => tokio::time::sleep(deadline.since(breakers.now())).await,
        None => std::future::pending().await,
    }
}

/// The kernel verdict for an engine decision.
pub fn verdict_spec(decision: Decision) -> VerdictSpec {
    let spec = match decision.action {
        Enforcement::Probe { budget, round } => VerdictSpec::probe(budget, round),
        Enforcement::Reject if decision.is_partial() => {
            // 1/65536 units; 100 % would not fit in u16, but that is OPEN, not PARTIAL.
            VerdictSpec::partial(decision.reject_percent.scaled_to(65_536).min(65_535) as u16)
        }
        Enforcement::Reject => VerdictSpec::reject(),
    };
    if decision.dry_run {
        spec.dry_run()
    } else {
        spec
    }
}

/// The default control socket for a pin directory: one agent per pin directory, so two
/// agents on one machine (tests, or a staged upgrade) never share a socket.
pub fn default_socket(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    PathBuf::from("/run/circuit").join(format!("{name}.sock"))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use circuit_common::ConnectOutcome;

    use super::*;
    use crate::engine::{BreakerPolicy, EngineConfig, ManualClock};

    #[test]
    fn groups_panic_guards_and_engine_memory_are_exported_and_removed_groups_leave() {
        use crate::engine::{GroupConfig, Selector};
        let clock = ManualClock::new(crate::time::MonoTime::from_nanos(1));
        let mut config = EngineConfig::with_policy(BreakerPolicy {
            failure_threshold: 1,
            min_witnesses: 1,
            ..BreakerPolicy::default()
        });
        config.groups.push(GroupConfig {
            name: "web".into(),
            upstreams: vec![Selector::any_port("192.0.2.0/24".parse().unwrap())],
            max_ejection_percent: crate::engine::Percent::new(50),
            always_eject_one: true,
            guard: Default::default(),
            policy: Default::default(),
        });
        let mut breakers = Breakers::with_config(&config, clock.clone()).unwrap();
        let metrics = Metrics::new(None, 10);
        breakers.record("192.0.2.1:80".parse().unwrap(), ConnectOutcome::Connected);
        breakers.record("192.0.2.2:80".parse().unwrap(), ConnectOutcome::Refused);
        metrics.engine_state(&breakers);
        let text = metrics.encode();
        for line in [
            r#"circuit_group_upstreams{group="web",upstreams="tracked"} 2"#,
            r#"circuit_group_upstreams{group="web",upstreams="isolated"} 1"#,
            r#"circuit_panic_guard_suppressing{scope="node",group=""} 0"#,
            r#"circuit_panic_guard_upstreams{scope="group",group="web",upstreams="active"} 2"#,
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        let memory: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("circuit_engine_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(memory > 0.0, "{text}");

        config.groups.clear();
        breakers.apply_config(&config).unwrap();
        metrics.engine_state(&breakers);
        assert!(!metrics.encode().contains(r#"group="web""#));
    }

    #[test]
    fn an_evicted_breakers_metric_series_go_with_it() {
        let clock = ManualClock::new(crate::time::MonoTime::from_nanos(1));
        let mut config = EngineConfig::with_policy(BreakerPolicy {
            failure_threshold: 1,
            min_witnesses: 1,
            ..BreakerPolicy::default()
        });
        config.tracking.max_upstreams = 1;
        let mut breakers = Breakers::with_config(&config, clock.clone()).unwrap();
        let metrics = Metrics::new(None, 10);
        let (a, b): (SocketAddr, SocketAddr) = (
            "192.0.2.1:80".parse().unwrap(),
            "192.0.2.2:80".parse().unwrap(),
        );
        let trip = breakers.record(a, ConnectOutcome::Refused).unwrap();
        metrics.transition(&trip, None);
        let closed = breakers.reset(a).unwrap();
        metrics.transition(&closed, None);
        assert!(metrics.encode().contains(r#"upstream="192.0.2.1:80""#));
        // `b` needs the only place: `a`, CLOSED, is evicted for it.
        breakers.record(b, ConnectOutcome::Connected);
        log_notices(&mut breakers, &metrics);
        assert!(breakers.get(&a).is_none());
        let text = metrics.encode();
        assert!(!text.contains(r#"upstream="192.0.2.1:80""#), "{text}");

        // Evicted and back within one batch of outcomes: its new series stays.
        breakers.record(a, ConnectOutcome::Connected); // `b` goes
        log_notices(&mut breakers, &metrics);
        breakers.record(b, ConnectOutcome::Connected); // `a` goes...
        breakers.record(a, ConnectOutcome::Connected); // ...and comes back
        let trip = breakers.record(a, ConnectOutcome::Refused).unwrap();
        metrics.transition(&trip, None);
        log_notices(&mut breakers, &metrics);
        assert!(
            metrics
                .encode()
                .contains(r#"circuit_breaker_state{upstream="192.0.2.1:80"} 1"#),
            "{}",
            metrics.encode()
        );
    }
}
