//! `circuit-agent attach`: the daemon that joins the engine to the kernel.
//!
//! One task owns all state: it sleeps until the kernel submits outcomes, a breaker timer is
//! due, leases need renewing or a signal arrives, so no locks are needed and nothing polls.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use circuit_common::VerdictState;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    engine::{
        BreakerPolicy, Breakers, Clock, Enforcement, MonotonicClock, Transition, outcome_name,
    },
    kernel::{Dataplane, DataplaneOptions, Outcome, VerdictTable},
    time::MonoTime,
};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub dataplane: DataplaneOptions,
    pub policy: BreakerPolicy,
    /// How long a verdict stays enforced without renewal; bounds how long a dead agent's
    /// verdicts can outlive it.
    pub lease: Duration,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let mut breakers =
        Breakers::new(options.policy.clone(), MonotonicClock).context("invalid breaker policy")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let mut dataplane = Dataplane::attach(&options.dataplane)?;
    let mut outcomes = dataplane
        .take_outcomes()
        .context("outcome stream already taken")?;
    let mut sync = VerdictSync {
        table: &mut dataplane.verdicts,
        lease: options.lease,
    };
    sync.adopt(&mut breakers)?;
    info!(
        pin_dir = %options.dataplane.pin_dir.display(),
        enforcing = %dataplane.attached.join(", "),
        failure_threshold = options.policy.failure_threshold,
        open_duration = %humantime::format_duration(options.policy.open_duration),
        half_open_probes = options.policy.half_open_probes,
        lease = %humantime::format_duration(options.lease),
        "circuit-agent ready"
    );

    let mut renew = tokio::time::interval(options.lease / 3);
    let mut batch = Vec::new();
    loop {
        let timer = sleep_until(&breakers);
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            read = outcomes.next_batch(&mut batch) => {
                let undecodable = read?;
                if undecodable > 0 {
                    warn!(undecodable, "outcome records with an unknown layout were skipped");
                }
                for outcome in batch.drain(..) {
                    tracing::debug!(
                        upstream = %outcome.upstream,
                        outcome = %outcome_name(outcome.outcome),
                        latency_us = outcome.latency.as_micros() as u64,
                        "connection outcome"
                    );
                    if let Some(t) = breakers.record(outcome.upstream, outcome.outcome) {
                        sync.apply(&breakers, &t, Some(&outcome))?;
                    }
                }
            }
            _ = timer => {
                for t in breakers.tick() {
                    sync.apply(&breakers, &t, None)?;
                }
            }
            _ = renew.tick() => sync.renew_all(&breakers)?,
        }
    }
    info!("detaching programs; pinned verdicts stay until their leases end");
    Ok(())
}

/// Sleeps until the engine's next deadline (forever when there is none).
async fn sleep_until<C: Clock>(breakers: &Breakers<C>) {
    match breakers.next_deadline() {
        Some(deadline) => tokio::time::sleep(deadline.since(breakers.now())).await,
        None => std::future::pending().await,
    }
}

/// Keeps the kernel's verdicts equal to what the engine decides.
struct VerdictSync<'a> {
    table: &'a mut VerdictTable,
    lease: Duration,
}

impl VerdictSync<'_> {
    fn lease_from(&self, now: MonoTime) -> MonoTime {
        now.saturating_add(self.lease)
    }

    /// Takes over the verdicts a previous agent left whose leases are still running.
    fn adopt<C: Clock>(&mut self, breakers: &mut Breakers<C>) -> anyhow::Result<()> {
        let now = breakers.now();
        for stored in self.table.list()? {
            if stored.lease_expires <= now {
                self.table.clear(stored.upstream)?;
                continue;
            }
            let enforcement = match stored.state {
                VerdictState::Open => Enforcement::Reject,
                VerdictState::HalfOpen => Enforcement::Probe {
                    budget: stored.probe_budget,
                },
                // Partial verdicts come from configuration, which the new agent re-derives.
                VerdictState::Partial => continue,
            };
            let t = breakers.adopt(stored.upstream, enforcement);
            self.table.renew(stored.upstream, self.lease_from(now))?;
            log_transition(&t, None);
        }
        Ok(())
    }

    fn apply<C: Clock>(
        &mut self,
        breakers: &Breakers<C>,
        t: &Transition,
        cause: Option<&Outcome>,
    ) -> anyhow::Result<()> {
        let now = breakers.now();
        self.write(t.upstream, breakers.enforcement(&t.upstream), now)?;
        log_transition(t, cause.map(|o| breakers.now().since(o.observed_at)));
        Ok(())
    }

    fn write(
        &mut self,
        upstream: SocketAddr,
        enforcement: Option<Enforcement>,
        now: MonoTime,
    ) -> anyhow::Result<()> {
        let lease = self.lease_from(now);
        match enforcement {
            None => self.table.clear(upstream),
            Some(Enforcement::Reject) => self.table.reject(upstream, lease),
            Some(Enforcement::Probe { budget }) => self.table.probe(upstream, budget, lease),
        }
    }

    fn renew_all<C: Clock>(&mut self, breakers: &Breakers<C>) -> anyhow::Result<()> {
        let lease = self.lease_from(breakers.now());
        for (upstream, enforcement) in breakers.enforcements() {
            // A verdict removed behind our back (by an operator, say) is written again.
            if !self.table.renew(upstream, lease)? {
                self.write(upstream, Some(enforcement), breakers.now())?;
            }
        }
        Ok(())
    }
}

fn log_transition(t: &Transition, detect_to_verdict: Option<Duration>) {
    let c = t.counts;
    info!(
        upstream = %t.upstream,
        from = %t.change.from,
        to = %t.change.to,
        reason = %t.change.reason,
        connected = c.connected,
        refused = c.refused,
        timed_out = c.timed_out,
        rejected = c.rejected,
        detect_to_verdict_us = detect_to_verdict.map(|d| d.as_micros() as u64),
        "breaker transition"
    );
}
