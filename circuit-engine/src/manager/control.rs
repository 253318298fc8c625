//! What operators and restarts ask of the breakers: manual commands, adopting what a
//! previous agent left in the kernel, and a new configuration.

use std::{net::SocketAddr, time::Duration};

use super::{Breakers, ControlError, group_states};
use crate::{
    Enforcement, Transition,
    breaker::{Breaker, BreakerState, Change, Reason},
    clock::{Clock, MonoTime},
    rules::Rules,
    settings::{EngineConfig, InvalidSetting},
};

impl<C: Clock> Breakers<C> {
    /// Takes over an upstream whose enforcement a previous agent left in the kernel, so a
    /// restart keeps isolating it instead of re-learning. An open breaker restarts its open
    /// period: the time already spent is unknown. Adoption may exceed `max_upstreams` (it
    /// happens at start, and the kernel holds at most that many verdicts). A never-isolated
    /// upstream is not adopted: the transition says CLOSED, and the verdict should be
    /// cleared.
    pub fn adopt(&mut self, upstream: SocketAddr, enforcement: Enforcement) -> Transition {
        let now = self.clock.now();
        let half_open = matches!(enforcement, Enforcement::Probe { .. });
        if let Some(i) = self.find(&upstream) {
            self.evict(i);
        }
        let Some(placement) = self.rules.place(upstream) else {
            let from = if half_open {
                BreakerState::HalfOpen
            } else {
                BreakerState::Open
            };
            return Transition {
                upstream,
                change: Change {
                    from,
                    to: BreakerState::Closed,
                    reason: Reason::NeverIsolated,
                    at: now,
                    open: None,
                },
                counts: Default::default(),
                dry_run: false,
                client: None,
            };
        };
        let policy = self.rules.policy(placement.policy);
        let breaker = Breaker::adopted(half_open, policy, now, &mut self.rng);
        let i = self.insert(upstream, breaker, placement.policy, placement.group, now);
        let breaker = &self.slot(i).breaker;
        let to = if breaker.is_dry_run() {
            breaker.circuit_state()
        } else {
            breaker.state()
        };
        let change = Change {
            from: BreakerState::Closed,
            to,
            reason: Reason::Adopted,
            at: now,
            open: breaker.open_period(),
        };
        self.transition(i, change)
    }

    /// Holds `upstream` open (FORCED_OPEN) for `duration`, or until enabled or reset; then it
    /// returns to CLOSED. Group caps and guards do not apply to operators.
    pub fn force_open(
        &mut self,
        upstream: SocketAddr,
        duration: Option<Duration>,
    ) -> Result<Transition, ControlError> {
        self.control(upstream, |breaker, now| {
            breaker.force_open(now, duration.map(|d| now.saturating_add(d)))
        })
    }

    /// [`Breakers::force_open`] until a point in time, as stored by an operator override
    /// that outlives the agent (a past `until` expires at the next tick).
    pub fn force_open_until(
        &mut self,
        upstream: SocketAddr,
        until: Option<MonoTime>,
    ) -> Result<Transition, ControlError> {
        self.control(upstream, |breaker, now| breaker.force_open(now, until))
    }

    /// Back to CLOSED with every counter and all history cleared; lifts a manual hold.
    pub fn reset(&mut self, upstream: SocketAddr) -> Result<Transition, ControlError> {
        let t = self.control(upstream, Breaker::reset)?;
        // Its clients' own holds go with the rest of its state.
        for hold in self.client_holds.release_upstream(upstream) {
            self.client_changes.push_back(Transition {
                upstream,
                change: Change {
                    from: BreakerState::Open,
                    to: BreakerState::Closed,
                    reason: t.change.reason,
                    at: t.change.at,
                    open: None,
                },
                counts: t.counts,
                dry_run: hold.dry_run,
                client: Some(hold.client),
            });
        }
        Ok(t)
    }

    /// DISABLED until enabled or reset: never trips, enforces nothing.
    pub fn disable(&mut self, upstream: SocketAddr) -> Result<Transition, ControlError> {
        self.control(upstream, Breaker::disable)
    }

    /// Lifts a manual hold (FORCED_OPEN or DISABLED): CLOSED, in the policy's mode.
    pub fn enable(&mut self, upstream: SocketAddr) -> Result<Transition, ControlError> {
        self.control(upstream, Breaker::enable)
    }

    fn control(
        &mut self,
        upstream: SocketAddr,
        command: impl FnOnce(&mut Breaker, MonoTime) -> Change,
    ) -> Result<Transition, ControlError> {
        let now = self.clock.now();
        self.expire_activity(now);
        let i = match self.find(&upstream) {
            Some(i) => i,
            None => {
                let placement = self
                    .rules
                    .place(upstream)
                    .ok_or(ControlError::NeverIsolated { upstream })?;
                if !self.make_room() {
                    return Err(ControlError::AtCapacity {
                        upstream,
                        tracked: self.len(),
                    });
                }
                let breaker = Breaker::for_policy(self.rules.policy(placement.policy), now);
                self.insert(upstream, breaker, placement.policy, placement.group, now)
            }
        };
        let slot = self.slots[i as usize].as_mut().expect("occupied slot");
        let change = command(&mut slot.breaker, now);
        self.sync(i, now);
        Ok(self.transition(i, change))
    }

    /// Takes a new configuration and keeps every breaker's state and counters: only policies,
    /// groups, guards and bounds change. Returns the changes operators see (a mode changed,
    /// or an upstream became never-isolated and is released).
    pub fn apply_config(
        &mut self,
        config: &EngineConfig,
    ) -> Result<Vec<Transition>, InvalidSetting> {
        config.check()?;
        let now = self.clock.now();
        self.rules = Rules::compile(config);
        self.groups = group_states(config);
        self.node_guard = config.guard.clone();
        self.tracking = config.tracking.clone();
        self.services_config = config.services.clone();
        let mut transitions = Vec::new();
        for i in 0..self.slots.len() as u32 {
            let Some(slot) = self.slots[i as usize].as_mut() else {
                continue;
            };
            match self.rules.place(slot.upstream) {
                None => {
                    if slot.breaker.is_isolating() {
                        let change = Change {
                            from: slot.breaker.state(),
                            to: BreakerState::Closed,
                            reason: Reason::NeverIsolated,
                            at: now,
                            open: None,
                        };
                        transitions.push(Transition {
                            upstream: slot.upstream,
                            change,
                            counts: slot.breaker.counts(),
                            dry_run: false,
                            client: None,
                        });
                    }
                    // The counts are rebuilt below, from the new groups.
                    self.remove(i);
                }
                Some(placement) => {
                    slot.policy = placement.policy;
                    slot.group = placement.group;
                    let policy = self.rules.policy(placement.policy);
                    if let Some(change) = slot.breaker.reconfigure(policy, now) {
                        transitions.push(self.transition(i, change));
                    }
                }
            }
        }
        self.rebuild_indexes(now);
        while self.len() > self.tracking.max_upstreams as usize && self.make_room_once() {}
        Ok(transitions)
    }
}
