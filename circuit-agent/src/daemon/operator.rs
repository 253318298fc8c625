//! Operator commands from the control socket, and their record for the next agent.

use std::{net::SocketAddr, time::Duration};

use circuit_common::OverrideKind;
use tracing::{error, info, warn};

use super::sync::VerdictSync;
use crate::{
    engine::{Breakers, Clock},
    ports::{OverrideStore, VerdictStore},
    surfaces::control::{OperatorCommand, OperatorReply},
    time::MonoTime,
};

/// Carries out operator commands (`trip`, `reset`, `disable`, `enable`) from the control
/// socket, and keeps a record of the standing ones (trips and disables) in the pinned
/// OVERRIDES map, so that the next agent restores them. No kernel program reads that map:
/// with no agent running, a trip holds only until its verdict's lease ends.
pub(super) struct Operator<O> {
    pub(super) table: O,
}

impl<O: OverrideStore> Operator<O> {
    /// Re-applies the standing commands an earlier agent recorded.
    pub(super) fn restore<C: Clock, V: VerdictStore>(
        &mut self,
        breakers: &mut Breakers<C>,
        sync: &mut VerdictSync<'_, V>,
    ) -> anyhow::Result<()> {
        let now = breakers.now();
        for o in self.table.list()? {
            let result = match o.kind {
                OverrideKind::ForcedOpen if o.until.is_some_and(|u| u <= now) => {
                    self.forget(o.upstream);
                    continue;
                }
                OverrideKind::ForcedOpen => breakers.force_open_until(o.upstream, o.until),
                OverrideKind::Disabled => breakers.disable(o.upstream),
                // A one-off request an older CLI left for its agent.
                OverrideKind::Reset => {
                    self.forget(o.upstream);
                    breakers.reset(o.upstream)
                }
            };
            match result {
                Ok(t) => sync.apply(breakers, &t, None)?,
                Err(err) => {
                    warn!(upstream = %o.upstream, %err, "recorded operator command not restored");
                    self.forget(o.upstream);
                }
            }
        }
        Ok(())
    }

    /// Carries out one command; the reply says what happened.
    pub(super) fn handle<C: Clock, V: VerdictStore>(
        &mut self,
        command: OperatorCommand,
        breakers: &mut Breakers<C>,
        sync: &mut VerdictSync<'_, V>,
    ) -> OperatorReply {
        let upstream = command.upstream();
        let now = breakers.now();
        let result = match command {
            OperatorCommand::Trip { duration_ms, .. } => {
                let until = duration_ms.map(|ms| now.saturating_add(Duration::from_millis(ms)));
                breakers
                    .force_open_until(upstream, until)
                    .inspect(|_| self.record(upstream, OverrideKind::ForcedOpen, until, now))
            }
            OperatorCommand::Disable { .. } => breakers
                .disable(upstream)
                .inspect(|_| self.record(upstream, OverrideKind::Disabled, None, now)),
            OperatorCommand::Reset { .. } => breakers.reset(upstream).inspect(|_| {
                self.forget(upstream);
            }),
            OperatorCommand::Enable { .. } => breakers.enable(upstream).inspect(|_| {
                self.forget(upstream);
            }),
        };
        match result {
            Ok(t) => {
                info!(%upstream, ?command, "operator command applied");
                if let Err(err) = sync.apply(breakers, &t, None) {
                    error!(%upstream, error = %format!("{err:#}"), "verdict not written");
                }
                OperatorReply {
                    upstream,
                    applied: true,
                    state: breakers.get(&upstream).map(|b| b.state()),
                    message: t.change.reason.to_string(),
                }
            }
            Err(err) => {
                warn!(%upstream, %err, "operator command refused");
                OperatorReply {
                    upstream,
                    applied: false,
                    state: breakers.get(&upstream).map(|b| b.state()),
                    message: err.to_string(),
                }
            }
        }
    }

    /// Records a standing command; a failure costs only its restoration by the next agent.
    fn record(
        &mut self,
        upstream: SocketAddr,
        kind: OverrideKind,
        until: Option<MonoTime>,
        now: MonoTime,
    ) {
        if let Err(err) = self.table.set(upstream, kind, until, now) {
            error!(%upstream, error = %format!("{err:#}"), "operator command not recorded for the next agent");
        }
    }

    pub(super) fn forget(&mut self, upstream: SocketAddr) {
        if let Err(err) = self.table.remove(upstream) {
            error!(%upstream, error = %format!("{err:#}"), "stale operator record not removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use circuit_common::VerdictState;

    use super::*;
    use crate::{
        daemon::memory::{MemoryOverrides, MemoryVerdicts},
        engine::{BreakerPolicy, BreakerState, ManualClock},
        surfaces::{control::EventHub, metrics::Metrics},
    };

    const LEASE: Duration = Duration::from_secs(15);

    fn upstream() -> SocketAddr {
        "192.0.2.1:443".parse().unwrap()
    }

    fn breakers(clock: &ManualClock) -> Breakers<ManualClock> {
        Breakers::new(BreakerPolicy::default(), clock.clone()).unwrap()
    }

    /// Runs `f` with a sync over `store` and the real surfaces.
    fn with_sync<R>(
        store: &mut MemoryVerdicts,
        f: impl FnOnce(&mut VerdictSync<'_, MemoryVerdicts>) -> R,
    ) -> R {
        let (metrics, events) = (Metrics::new(None, 100), EventHub::default());
        let mut sync = VerdictSync {
            table: store,
            lease: LEASE,
            metrics: &metrics,
            events: &events,
            lifecycles: HashMap::new(),
            routes: Default::default(),
            names: None,
        };
        f(&mut sync)
    }

    #[test]
    fn a_trip_is_enforced_recorded_and_restored_by_the_next_agent() {
        let clock = ManualClock::new(MonoTime::from_nanos(1_000_000_000));
        let (mut store, mut operator) = (
            MemoryVerdicts::default(),
            Operator {
                table: MemoryOverrides::default(),
            },
        );
        let mut first = breakers(&clock);
        let reply = with_sync(&mut store, |sync| {
            operator.handle(
                OperatorCommand::Trip {
                    upstream: upstream(),
                    duration_ms: Some(60_000),
                },
                &mut first,
                sync,
            )
        });
        assert!(reply.applied, "{reply:?}");
        assert_eq!(reply.state, Some(BreakerState::ForcedOpen));
        assert_eq!(store.verdicts[&upstream()].state, VerdictState::Open);
        let record = operator.table.0[&upstream()];
        assert_eq!(record.kind, OverrideKind::ForcedOpen);
        assert_eq!(
            record.until,
            Some(clock.now().saturating_add(Duration::from_secs(60)))
        );

        // The next agent: a fresh engine, the same records.
        clock.advance(Duration::from_secs(10));
        store.verdicts.clear();
        let mut next = breakers(&clock);
        with_sync(&mut store, |sync| operator.restore(&mut next, sync)).unwrap();
        assert_eq!(
            next.get(&upstream()).map(|b| b.state()),
            Some(BreakerState::ForcedOpen)
        );
        assert_eq!(store.verdicts[&upstream()].state, VerdictState::Open);
    }

    #[test]
    fn an_expired_trip_is_forgotten_not_restored() {
        let clock = ManualClock::new(MonoTime::from_nanos(1_000_000_000));
        let mut operator = Operator {
            table: MemoryOverrides::default(),
        };
        let until = clock.now().saturating_add(Duration::from_secs(1));
        operator
            .table
            .set(
                upstream(),
                OverrideKind::ForcedOpen,
                Some(until),
                clock.now(),
            )
            .unwrap();
        clock.advance(Duration::from_secs(2));
        let (mut store, mut next) = (MemoryVerdicts::default(), breakers(&clock));
        with_sync(&mut store, |sync| operator.restore(&mut next, sync)).unwrap();
        assert!(next.get(&upstream()).is_none());
        assert!(store.verdicts.is_empty());
        assert!(operator.table.0.is_empty(), "the stale record is removed");
    }

    #[test]
    fn reset_lifts_the_verdict_and_the_record() {
        let clock = ManualClock::new(MonoTime::from_nanos(1_000_000_000));
        let (mut store, mut operator, mut set) = (
            MemoryVerdicts::default(),
            Operator {
                table: MemoryOverrides::default(),
            },
            breakers(&clock),
        );
        let up = upstream();
        with_sync(&mut store, |sync| {
            operator.handle(OperatorCommand::Disable { upstream: up }, &mut set, sync);
            assert_eq!(operator.table.0[&up].kind, OverrideKind::Disabled);
            let reply = operator.handle(OperatorCommand::Reset { upstream: up }, &mut set, sync);
            assert!(reply.applied, "{reply:?}");
            assert_eq!(reply.state, Some(BreakerState::Closed));
        });
        assert!(operator.table.0.is_empty());
        assert!(store.verdicts.is_empty());
    }
}
