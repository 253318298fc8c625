//! The operator commands (`trip`, `reset`, `disable`, `enable`): through the running agent,
//! or, with no agent, on the pinned maps under the pin directory's lock.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;
use circuit_common::OverrideKind;

use super::{BadInput, OperatorArgs, read::ask_agent};
use crate::{
    config::Config,
    engine::{BreakerState, Breakers, Clock},
    kernel::{OverrideTable, VerdictSpec, VerdictTable},
    surfaces::control::{self, OperatorCommand, OperatorReply, Request},
    time::MonotonicClock,
};

/// An operator command refused by the agent (never-isolate list, capacity...).
#[derive(Debug, thiserror::Error)]
#[error("{upstream}: not applied: {message}")]
struct Refused {
    upstream: SocketAddr,
    message: String,
}

/// Sends an operator command to the running agent, the only writer of kernel verdicts.
pub(super) fn operate(command: OperatorCommand, target: &OperatorArgs) -> anyhow::Result<()> {
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
