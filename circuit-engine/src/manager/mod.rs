//! [`Breakers`]: every breaker of the node, the indexes around them, and the group and panic
//! guards between a detector and a trip.
//!
//! Layout: breakers live in slots (a slab) found through a hash index; a timer set orders the
//! time-driven deadlines, an intrusive LRU list orders the evictable (CLOSED, unheld)
//! breakers by last activity, and another such list orders the panic guard's "active" marks by
//! last signal, so that they expire from its oldest end. Each
//! slot caches what the indexes know about it, and [`Breakers::sync`] brings the indexes in
//! line after anything touched a breaker. `record` is O(1) amortized and allocates nothing
//! once its upstream's breaker exists (timers are only touched on transitions, and a
//! breaker's trip history is allocated on its first trip).

use std::{
    collections::{BTreeSet, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use circuit_common::ConnectOutcome;

use super::{
    Decision, Enforcement, Transition,
    backoff::JitterRng,
    breaker::{Breaker, BreakerState, Change, Observation, Reason, Signal, Step},
    eviction::{EvictionBudgets, EvictionOrder},
    guard::{Activity, GuardPolicy, GuardScope, Suppressed, SuppressionCause, may_isolate_another},
    index::SlotIndex,
    lru::LruList,
    policy::{BreakerPolicy, PolicyError},
    rules::{GroupId, PolicyId, Rules},
    units::Percent,
    window::WindowTotals,
    witness::{ClientHold, ClientHolds, ClientId, Scope},
};
use crate::services::{ServiceBook, ServiceState, ServicesConfig, derive_state};
use crate::{
    clock::{Clock, MonoTime},
    settings::{EngineConfig, InvalidSetting, TrackingConfig},
};

mod activity;
mod control;

/// Notices kept until drained; older ones are dropped (and counted) so a caller that never
/// drains cannot grow memory.
pub const NOTICE_CAPACITY: usize = 1_024;

/// Something the caller should log or count that is not a state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A detector wanted to trip a breaker and a group cap or panic guard stopped it.
    Suppressed(Suppressed),
    /// The tracking bound is reached and every tracked breaker is OPEN, HALF_OPEN or held:
    /// outcomes of new upstreams are ignored until one closes. Once per such episode.
    Saturated {
        upstream: SocketAddr,
        tracked: usize,
        at: MonoTime,
    },
    /// A service's NAT was seen to pick a new endpoint: the caller's view of the service
    /// (its kernel route) must follow.
    EndpointLearned {
        service: SocketAddr,
        endpoint: SocketAddr,
    },
    /// An endpoint of a service had no outcome for `tracking.idle_after` and is forgotten.
    EndpointForgotten {
        service: SocketAddr,
        endpoint: SocketAddr,
    },
    /// A breaker was dropped with what it had learned (idle, or for room): whatever the
    /// caller keeps per upstream (metric series) can go too.
    Evicted {
        upstream: SocketAddr,
        cause: EvictionCause,
    },
}

/// Why a breaker was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionCause {
    /// No outcome for `tracking.idle_after`.
    Idle,
    /// The tracking bound was reached and a new upstream needed its place.
    Room,
    /// The address turned out to be a service's virtual address: its endpoints have the
    /// breakers now, and its own verdict must go.
    BecameService,
}

/// Why a manual command could not be carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{upstream} is on the never-isolate list")]
    NeverIsolated { upstream: SocketAddr },
    #[error(
        "cannot track {upstream}: {tracked} upstreams are tracked (the maximum) and none is CLOSED"
    )]
    AtCapacity {
        upstream: SocketAddr,
        tracked: usize,
    },
}

/// Running totals of what the manager did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagerStats {
    pub created: u64,
    pub evicted_idle: u64,
    pub evicted_for_room: u64,
    /// New upstreams left untracked because their client had spent its eviction budget.
    pub evictions_refused: u64,
    /// Outcomes ignored because the tracking bound was reached with nothing evictable.
    pub untracked_outcomes: u64,
    /// Outcomes of never-isolated upstreams (not tracked).
    pub never_isolated_outcomes: u64,
    /// Suppressed trips, counted once per episode like their notices.
    pub suppressed_trips: u64,
    pub notices_dropped: u64,
    /// Clients failed fast on their own (trips kept from the node for want of witnesses).
    pub client_holds: u64,
    /// Outcomes that named a known service's virtual address, its endpoint unresolved: no
    /// evidence about any endpoint (see [`crate::ServiceBook`]).
    pub unresolved_service_outcomes: u64,
}

/// A group's numbers, for metrics and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus<'a> {
    pub name: &'a str,
    /// Tracked upstreams in the group.
    pub members: u32,
    /// Of which OPEN, HALF_OPEN or forced open (dry runs included).
    pub isolated: u32,
    pub activity: Activity,
    pub panicking: bool,
}

/// Heap memory the manager holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    pub tracked: usize,
    pub bytes: usize,
}

#[derive(Clone, Debug)]
struct GroupState {
    name: Arc<str>,
    max_ejection: Percent,
    always_eject_one: bool,
    guard: GuardPolicy,
    members: u32,
    isolated: u32,
    activity: Activity,
}

/// The panic guard's view of one upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ActivityMark {
    active: bool,
    failing: bool,
    last_signal: MonoTime,
}

/// Recording is bound by cache misses on the slot, so `repr(C)` and cache-line alignment
/// put what a usual outcome touches in the slot's first two cache lines: these fields up to
/// `group`, then the breaker's hot fields (see [`Breaker`]). `timer` comes first because
/// `Option<Slot>` keeps its None in `timer`'s tag, so every occupancy check reads it.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
struct Slot {
    /// The deadline registered in `timers`.
    timer: Option<MonoTime>,
    upstream: SocketAddr,
    activity: ActivityMark,
    policy: PolicyId,
    group: Option<GroupId>,
    breaker: Breaker,
    /// Whether the slot is counted in its group's `isolated`.
    counted_isolated: bool,
}

/// All breakers of the node, created on an upstream's first outcome.
pub struct Breakers<C> {
    clock: C,
    rules: Rules,
    groups: Vec<GroupState>,
    node_guard: GuardPolicy,
    node_activity: Activity,
    tracking: TrackingConfig,
    index: SlotIndex,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    eviction: EvictionOrder,
    eviction_budgets: EvictionBudgets,
    timers: BTreeSet<(MonoTime, u32)>,
    /// The active slots, least recently signalled first: marks expire from the oldest end.
    /// Each signal moves its slot to the newest end, cheaper than re-arming a timer heap
    /// each time a mark outlives its expiry. The times are the slots' `last_signal`.
    active_by_signal: LruList<()>,
    rng: JitterRng,
    notices: VecDeque<Notice>,
    stats: ManagerStats,
    saturated: bool,
    client_holds: ClientHolds,
    client_changes: VecDeque<Transition>,
    services: ServiceBook,
    services_config: ServicesConfig,
}

impl<C: Clock> Breakers<C> {
    /// Breakers applying `policy` to every upstream (no groups, nothing exempt, the default
    /// tracking bounds and node panic guard).
    pub fn new(policy: BreakerPolicy, clock: C) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(Self::build(&EngineConfig::with_policy(policy), clock))
    }

    /// Breakers for a whole configuration. Jitter is seeded from the clock; see
    /// [`Breakers::with_jitter_seed`] for reproducible runs.
    pub fn with_config(config: &EngineConfig, clock: C) -> Result<Self, InvalidSetting> {
        config.check()?;
        Ok(Self::build(config, clock))
    }

    fn build(config: &EngineConfig, clock: C) -> Self {
        let seed = clock.now().as_nanos();
        Self {
            clock,
            rules: Rules::compile(config),
            groups: group_states(config),
            node_guard: config.guard.clone(),
            node_activity: Activity::default(),
            tracking: config.tracking.clone(),
            index: SlotIndex::default(),
            slots: Vec::new(),
            free: Vec::new(),
            eviction: EvictionOrder::default(),
            eviction_budgets: EvictionBudgets::default(),
            timers: BTreeSet::new(),
            active_by_signal: LruList::default(),
            rng: JitterRng::seeded(seed),
            notices: VecDeque::new(),
            stats: ManagerStats::default(),
            saturated: false,
            client_holds: ClientHolds::default(),
            client_changes: VecDeque::new(),
            services: ServiceBook::default(),
            services_config: config.services.clone(),
        }
    }

    /// Makes jitter reproducible.
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.rng = JitterRng::seeded(seed);
        self
    }

    pub fn now(&self) -> MonoTime {
        self.clock.now()
    }

    /// The default policy (`[defaults]`).
    pub fn policy(&self) -> &BreakerPolicy {
        self.rules.defaults()
    }

    /// The policy a tracked upstream follows.
    pub fn policy_of(&self, upstream: &SocketAddr) -> Option<&BreakerPolicy> {
        let slot = self.slot(self.find(upstream)?);
        Some(self.rules.policy(slot.policy))
    }

    /// The group a tracked upstream belongs to.
    pub fn group_of(&self, upstream: &SocketAddr) -> Option<&str> {
        let slot = self.slot(self.find(upstream)?);
        Some(&self.groups[usize::from(slot.group?)].name)
    }

    /// Feeds one outcome whose latency is unknown.
    pub fn record(&mut self, upstream: SocketAddr, outcome: ConnectOutcome) -> Option<Transition> {
        self.observe(upstream, outcome.into())
    }

    /// Feeds one outcome with its connect latency (for the slow-connect detector).
    pub fn record_with_latency(
        &mut self,
        upstream: SocketAddr,
        outcome: ConnectOutcome,
        latency: Duration,
    ) -> Option<Transition> {
        self.observe(
            upstream,
            Observation::new(outcome, Some(latency), ClientId::UNKNOWN),
        )
    }

    /// Feeds one outcome; returns the state change it caused, if any. Suppressed trips are
    /// reported through [`Breakers::drain_notices`].
    pub fn observe(
        &mut self,
        upstream: SocketAddr,
        observation: Observation,
    ) -> Option<Transition> {
        let now = self.clock.now();
        self.expire_activity(now);
        if !self.note_service(upstream, observation.service, now) {
            return None;
        }
        let i = self.slot_for_outcome(upstream, observation.client, now)?;
        let slot = self.slot(i);
        let signal = Signal::of(
            observation,
            self.rules.policy(slot.policy),
            slot.breaker.usual_connect_latency(),
        );
        self.eviction.touch(i, now);

        let slot = self.slots[i as usize].as_mut().expect("occupied slot");
        let policy = self.rules.policy(slot.policy);
        let step = slot
            .breaker
            .observe(observation, signal, now, policy, &mut self.rng);
        // The guards count a failure as the node would isolate on it: on the word of enough
        // clients. One process failing against every upstream it can name spends no guard
        // for the others (it only gets its own holds).
        let failed = matches!(signal, Signal::Failure);
        let failing_for_node = failed && slot.breaker.trips_for_node(policy, now);
        // Nor is a port scan (one client's failures at an upstream nobody has connected
        // to) activity that dilutes the guard's share. Failures enough clients witness do
        // count, connected or not: after a restart no breaker has connected yet, and the
        // node's own network failing then is what the guard is for.
        let scanned = failed && !failing_for_node && slot.breaker.counts().connected == 0;
        let (evictable, failed_lately) = (
            slot.breaker.is_evictable(),
            slot.breaker.has_failure_history(),
        );
        if !scanned {
            self.mark_activity(i, signal, failing_for_node, now);
        }
        self.eviction.place(i, evictable, failed_lately, now);
        let change = match step {
            Step::Quiet => None,
            Step::Changed(change) => Some(change),
            Step::WantsTrip(reason) => self.trip_unless_vetoed(i, reason, now),
        };
        // Without a state change the deadline, evictability and isolation are as synced
        // before: most outcomes change nothing.
        let change = change?;
        self.sync(i, now);
        Some(self.transition(i, change))
    }

    /// Keeps the services up to date with an outcome of `upstream` (reached through
    /// `service`'s NAT, if any); false when the outcome is no evidence about any breaker:
    /// it names a virtual address whose endpoint went unresolved, and a breaker for the
    /// whole service is what per-endpoint breaking replaces.
    fn note_service(
        &mut self,
        upstream: SocketAddr,
        service: Option<SocketAddr>,
        now: MonoTime,
    ) -> bool {
        if let Some(service) = service {
            // A never-isolated virtual address (the API server's ClusterIP, say) keeps its
            // endpoints out of reach too.
            if self.rules.is_never_isolated(service) {
                self.stats.never_isolated_outcomes += 1;
                return false;
            }
            let new_service = !self.services.knows(&service);
            if self.services.learn(service, upstream, now) {
                self.push_notice(Notice::EndpointLearned {
                    service,
                    endpoint: upstream,
                });
            }
            // A breaker that judged the virtual address as one upstream (before it was
            // known as a service, or left by an older agent) would never hear another
            // outcome: it goes, and its verdict with it.
            if new_service && let Some(i) = self.find(&service) {
                self.evict_for(i, EvictionCause::BecameService);
            }
            return true;
        }
        if !self.services.is_empty() && self.services.is_service(&upstream) {
            self.stats.unresolved_service_outcomes += 1;
            return false;
        }
        true
    }

    fn trip_unless_vetoed(&mut self, i: u32, reason: Reason, now: MonoTime) -> Option<Change> {
        if let Scope::Clients { witnesses, .. } = self.trip_scope(i, now) {
            self.hold_clients(i, &witnesses, reason, now);
            return None;
        }
        let cause = self.veto(i);
        let slot = self.slots[i as usize].as_mut().expect("occupied slot");
        let Some(cause) = cause else {
            let policy = self.rules.policy(slot.policy);
            return Some(slot.breaker.trip(reason, now, policy, &mut self.rng));
        };
        if slot.breaker.suppress() {
            let suppressed = Suppressed {
                upstream: slot.upstream,
                at: now,
                wanted: reason,
                cause,
                dry_run: slot.breaker.is_dry_run(),
            };
            self.stats.suppressed_trips += 1;
            self.push_notice(Notice::Suppressed(suppressed));
        }
        None
    }

    /// Whom a trip of the breaker in slot `i` would apply to.
    fn trip_scope(&self, i: u32, now: MonoTime) -> Scope {
        let slot = self.slot(i);
        slot.breaker.trip_scope(self.rules.policy(slot.policy), now)
    }

    /// Fails the `witnesses` of slot `i`'s upstream fast, each on its own, for the policy's
    /// open duration: what a wanted trip does without enough witnesses for the node.
    fn hold_clients(&mut self, i: u32, witnesses: &[ClientId], reason: Reason, now: MonoTime) {
        let slot = self.slot(i);
        let policy = self.rules.policy(slot.policy);
        let (upstream, dry_run, counts) = (
            slot.upstream,
            slot.breaker.is_dry_run(),
            slot.breaker.counts(),
        );
        let until = now.saturating_add(policy.open_duration);
        // Unattributed failures name nobody to hold.
        for &client in witnesses.iter().filter(|c| c.is_known()) {
            let hold = ClientHold {
                upstream,
                client,
                until,
                dry_run,
            };
            if !self.client_holds.hold(hold) {
                continue;
            }
            self.stats.client_holds += 1;
            self.client_changes.push_back(Transition {
                upstream,
                change: Change {
                    from: BreakerState::Closed,
                    to: BreakerState::Open,
                    reason,
                    at: now,
                    open: None,
                },
                counts,
                dry_run,
                client: Some(client),
            });
        }
    }

    /// Client-scoped changes since the last call: clients failed fast on their own, and
    /// released when their hold ended. Every process and XDP/TC ignore these; only the
    /// cgroup hook applies them, to the client's own connects.
    pub fn drain_client_changes(&mut self) -> impl Iterator<Item = Transition> + '_ {
        self.client_changes.drain(..)
    }

    /// The client-scoped holds in force.
    pub fn client_holds(&self) -> impl Iterator<Item = &ClientHold> {
        self.client_holds.iter()
    }

    /// The client-scoped holds of `upstream`.
    pub fn client_holds_of(&self, upstream: SocketAddr) -> impl Iterator<Item = &ClientHold> {
        self.client_holds.of(upstream)
    }

    fn release_expired_holds(&mut self, now: MonoTime) {
        for hold in self.client_holds.expire(now) {
            let counts = self
                .find(&hold.upstream)
                .map(|i| self.slot(i).breaker.counts())
                .unwrap_or_default();
            self.client_changes.push_back(Transition {
                upstream: hold.upstream,
                change: Change {
                    from: BreakerState::Open,
                    to: BreakerState::Closed,
                    reason: Reason::ClientHoldEnded,
                    at: now,
                    open: None,
                },
                counts,
                dry_run: hold.dry_run,
                client: Some(hold.client),
            });
        }
    }

    /// Why the breaker in slot `i` may not trip now, if it may not.
    fn veto(&self, i: u32) -> Option<SuppressionCause> {
        if self.node_activity.panics(&self.node_guard) {
            return Some(SuppressionCause::Panic {
                scope: GuardScope::Node,
                failing: self.node_activity.failing,
                active: self.node_activity.active,
                threshold: self.node_guard.failing_percent,
            });
        }
        if let Some(cause) = self.service_cap(i) {
            return Some(cause);
        }
        let group = &self.groups[usize::from(self.slot(i).group?)];
        if group.activity.panics(&group.guard) {
            return Some(SuppressionCause::Panic {
                scope: GuardScope::Group(group.name.clone()),
                failing: group.activity.failing,
                active: group.activity.active,
                threshold: group.guard.failing_percent,
            });
        }
        let allowed = may_isolate_another(
            group.isolated,
            group.members,
            group.max_ejection,
            group.always_eject_one,
        );
        (!allowed).then(|| SuppressionCause::MaxEjection {
            group: group.name.clone(),
            isolated: group.isolated,
            members: group.members,
            max: group.max_ejection,
        })
    }

    /// The per-service ejection cap, for an endpoint behind services.
    fn service_cap(&self, i: u32) -> Option<SuppressionCause> {
        let endpoint = self.slot(i).upstream;
        let max = self.services_config.max_ejection_percent;
        self.services
            .services_of(&endpoint)
            .iter()
            .find_map(|service| {
                let (mut members, mut isolated) = (0, 0);
                for e in self.services.endpoints(service) {
                    members += 1;
                    isolated += u32::from(self.isolates(&e));
                }
                (!may_isolate_another(isolated, members, max, true)).then(|| {
                    SuppressionCause::MaxEjection {
                        group: format!("service {service}").into(),
                        isolated,
                        members,
                        max,
                    }
                })
            })
    }

    /// Whether `upstream`'s breaker keeps it from every client (OPEN, HALF_OPEN, forced).
    pub fn isolates(&self, upstream: &SocketAddr) -> bool {
        self.get(upstream).is_some_and(Breaker::is_isolating)
    }

    /// Notes an endpoint of `service` learned elsewhere (a route an earlier agent left).
    pub fn learn_endpoint(&mut self, service: SocketAddr, endpoint: SocketAddr) {
        let now = self.clock.now();
        self.services.learn(service, endpoint, now);
    }

    /// The services learned from NAT decisions.
    pub fn services(&self) -> &ServiceBook {
        &self.services
    }

    pub fn services_config(&self) -> &ServicesConfig {
        &self.services_config
    }

    /// A service's state, derived from its known endpoints' breakers.
    pub fn service_state(&self, service: &SocketAddr) -> ServiceState {
        derive_state(self.services.endpoints(service).map(|e| self.isolates(&e)))
    }

    /// Whether connects to `service` may be re-routed (`[services]`).
    pub fn reroutes(&self, service: &SocketAddr) -> bool {
        self.services_config.reroute
            && !self
                .services_config
                .no_reroute
                .iter()
                .any(|s| s.matches(*service).is_some())
    }

    /// Applies every time-driven transition that is due, and drops idle breakers.
    pub fn tick(&mut self) -> Vec<Transition> {
        let now = self.clock.now();
        self.expire_activity(now);
        self.release_expired_holds(now);
        let mut due = self
            .timers
            .split_off(&(now.saturating_add(Duration::from_nanos(1)), 0));
        std::mem::swap(&mut due, &mut self.timers);
        let idle_after = self.tracking.idle_after;
        let mut transitions = Vec::new();
        // Each due breaker moves once: every time-driven transition sets a later deadline.
        for (_, i) in due {
            let slot = self.slots[i as usize]
                .as_mut()
                .expect("timers only hold occupied slots");
            slot.timer = None;
            let policy = self.rules.policy(slot.policy);
            let change = slot.breaker.tick(now, policy, idle_after);
            self.sync(i, now);
            if let Some(change) = change {
                transitions.push(self.transition(i, change));
            }
        }
        while let Some((i, touched)) = self.eviction.oldest()
            && touched.saturating_add(idle_after) <= now
        {
            self.evict_for(i, EvictionCause::Idle);
            self.stats.evicted_idle += 1;
        }
        let relearn_after = self.services_config.relearn_after;
        for (service, endpoint) in self.services.forget_idle(now, relearn_after) {
            self.push_notice(Notice::EndpointForgotten { service, endpoint });
        }
        transitions
    }

    /// The earliest time at which [`Breakers::tick`] has work (a transition or an eviction).
    pub fn next_deadline(&self) -> Option<MonoTime> {
        let timer = self.timers.first().map(|&(at, _)| at);
        let idle = self
            .eviction
            .oldest()
            .map(|(_, touched)| touched.saturating_add(self.tracking.idle_after));
        let hold = self.client_holds.next_deadline();
        let forget = self
            .services
            .next_forget(self.services_config.relearn_after);
        timer
            .into_iter()
            .chain(idle)
            .chain(hold)
            .chain(forget)
            .min()
    }

    /// What the enforcement points must do for `upstream`, dry runs included.
    pub fn decision(&self, upstream: &SocketAddr) -> Option<Decision> {
        let slot = self.slot(self.find(upstream)?);
        slot.breaker.decision(self.rules.policy(slot.policy))
    }

    /// Every upstream with a decision, dry runs included.
    pub fn decisions(&self) -> impl Iterator<Item = (SocketAddr, Decision)> + '_ {
        self.slots.iter().flatten().filter_map(|slot| {
            let decision = slot.breaker.decision(self.rules.policy(slot.policy))?;
            Some((slot.upstream, decision))
        })
    }

    /// The never-isolated (host, port) pairs of every host with a whole-host decision:
    /// what its verdict must spare (the host's DNS, say).
    pub fn spared(&self) -> BTreeSet<SocketAddr> {
        self.decisions()
            .filter(|(upstream, _)| upstream.port() == 0)
            .flat_map(|(host, _)| {
                self.rules
                    .never_isolated_ports(host.ip())
                    .into_iter()
                    .map(move |port| SocketAddr::new(host.ip(), port))
            })
            .collect()
    }

    /// The enforced action for `upstream`: [`Breakers::decision`] without dry runs and
    /// without the reject share (see [`Decision`]).
    pub fn enforcement(&self, upstream: &SocketAddr) -> Option<Enforcement> {
        self.decision(upstream).and_then(Decision::enforced_action)
    }

    /// Every upstream that currently needs enforcing (dry runs left out).
    pub fn enforcements(&self) -> impl Iterator<Item = (SocketAddr, Enforcement)> + '_ {
        self.decisions()
            .filter_map(|(upstream, decision)| Some((upstream, decision.enforced_action()?)))
    }

    pub fn get(&self, upstream: &SocketAddr) -> Option<&Breaker> {
        Some(&self.slot(self.find(upstream)?).breaker)
    }

    /// Every tracked upstream and its breaker.
    /// Calls and failures in `upstream`'s sliding window now (None without a window).
    pub fn window_totals(&mut self, upstream: &SocketAddr) -> Option<WindowTotals> {
        let now = self.clock.now();
        let i = self.find(upstream)?;
        self.slots[i as usize].as_mut()?.breaker.window_totals(now)
    }

    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &Breaker)> + '_ {
        self.slots
            .iter()
            .flatten()
            .map(|slot| (slot.upstream, &slot.breaker))
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Notices since the last drain, oldest first.
    pub fn drain_notices(&mut self) -> impl Iterator<Item = Notice> + '_ {
        self.notices.drain(..)
    }

    pub fn stats(&self) -> ManagerStats {
        self.stats
    }

    /// The node-wide panic guard's numbers, and whether it suppresses trips now.
    pub fn node_activity(&self) -> (Activity, bool) {
        (
            self.node_activity,
            self.node_activity.panics(&self.node_guard),
        )
    }

    pub fn groups(&self) -> impl Iterator<Item = GroupStatus<'_>> + '_ {
        self.groups.iter().map(|group| GroupStatus {
            name: &group.name,
            members: group.members,
            isolated: group.isolated,
            activity: group.activity,
            panicking: group.activity.panics(&group.guard),
        })
    }

    /// Heap memory held by the breakers and every index (capacities, not just lengths).
    pub fn memory(&self) -> MemoryUsage {
        let breaker_heap: usize = self.iter().map(|(_, b)| b.heap_bytes()).sum();
        // B-tree nodes hold up to 11 entries; count them about half full.
        let timers = self.timers.len() * 2 * size_of::<(MonoTime, u32)>();
        let bytes = self.slots.capacity() * size_of::<Option<Slot>>()
            + self.free.capacity() * size_of::<u32>()
            + self.active_by_signal.heap_bytes()
            + self.eviction.heap_bytes()
            + breaker_heap
            + self.index.heap_bytes()
            + self.services.heap_bytes()
            + timers;
        MemoryUsage {
            tracked: self.len(),
            bytes,
        }
    }

    /// Measured heap bytes per tracked upstream (all indexes included).
    pub fn approx_bytes_per_upstream(&self) -> usize {
        let usage = self.memory();
        usage.bytes / usage.tracked.max(1)
    }

    /// The slot of a tracked `upstream`.
    fn find(&self, upstream: &SocketAddr) -> Option<u32> {
        self.index.get(upstream, upstream_of(&self.slots))
    }

    fn slot(&self, i: u32) -> &Slot {
        self.slots[i as usize].as_ref().expect("occupied slot")
    }

    fn transition(&self, i: u32, change: Change) -> Transition {
        let slot = self.slot(i);
        Transition {
            upstream: slot.upstream,
            change,
            counts: slot.breaker.counts(),
            dry_run: slot.breaker.is_dry_run(),
            client: None,
        }
    }

    fn push_notice(&mut self, notice: Notice) {
        if self.notices.len() == NOTICE_CAPACITY {
            self.notices.pop_front();
            self.stats.notices_dropped += 1;
        }
        self.notices.push_back(notice);
    }

    /// The slot of `upstream`'s breaker, created on its first outcome.
    fn slot_for_outcome(
        &mut self,
        upstream: SocketAddr,
        client: ClientId,
        now: MonoTime,
    ) -> Option<u32> {
        if let Some(i) = self.find(&upstream) {
            return Some(i);
        }
        let Some(placement) = self.rules.place(upstream) else {
            self.stats.never_isolated_outcomes += 1;
            return None;
        };
        let at_bound = self.len() >= self.tracking.max_upstreams as usize;
        if at_bound
            && !self
                .eviction_budgets
                .take(client, self.tracking.client_evictions_per_second, now)
        {
            // This client has pushed out its share of breakers: its new upstream waits.
            self.stats.evictions_refused += 1;
            return None;
        }
        if !self.make_room() {
            self.stats.untracked_outcomes += 1;
            if !std::mem::replace(&mut self.saturated, true) {
                let tracked = self.len();
                self.push_notice(Notice::Saturated {
                    upstream,
                    tracked,
                    at: now,
                });
            }
            return None;
        }
        let breaker = Breaker::for_policy(self.rules.policy(placement.policy), now);
        Some(self.insert(upstream, breaker, placement.policy, placement.group, now))
    }

    /// Makes room for one more breaker if the bound requires it; false when nothing can go.
    fn make_room(&mut self) -> bool {
        self.len() < self.tracking.max_upstreams as usize || self.make_room_once()
    }

    /// Evicts a breaker for room (see [`EvictionOrder::victim`]), if any can go.
    fn make_room_once(&mut self) -> bool {
        let Some(i) = self.eviction.victim() else {
            return false;
        };
        self.evict_for(i, EvictionCause::Room);
        self.stats.evicted_for_room += 1;
        true
    }

    fn insert(
        &mut self,
        upstream: SocketAddr,
        breaker: Breaker,
        policy: PolicyId,
        group: Option<GroupId>,
        now: MonoTime,
    ) -> u32 {
        let slot = Slot {
            upstream,
            breaker,
            policy,
            group,
            timer: None,
            counted_isolated: false,
            activity: ActivityMark::default(),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 slots")
            }
        };
        self.index.insert(&upstream, i);
        if let Some(group) = group {
            self.groups[usize::from(group)].members += 1;
        }
        self.stats.created += 1;
        self.sync(i, now);
        i
    }

    /// Drops slot `i` and its contribution to every count.
    /// Evicts slot `i` and tells the caller (a [`Notice::Evicted`]).
    fn evict_for(&mut self, i: u32, cause: EvictionCause) {
        let upstream = upstream_of(&self.slots)(i);
        self.evict(i);
        self.push_notice(Notice::Evicted { upstream, cause });
    }

    fn evict(&mut self, i: u32) {
        let slot = self.remove(i);
        self.count_activity(slot.group, slot.activity, ActivityMark::default());
        if let Some(group) = slot.group {
            let group = &mut self.groups[usize::from(group)];
            group.members -= 1;
            group.isolated -= u32::from(slot.counted_isolated);
        }
    }

    /// Drops slot `i` from the slab and the indexes, leaving the counts to the caller.
    fn remove(&mut self, i: u32) -> Slot {
        let slot = self.slots[i as usize].take().expect("occupied slot");
        self.index.remove(&slot.upstream, i);
        self.eviction.remove(i);
        self.active_by_signal.remove(i);
        if let Some(at) = slot.timer {
            self.timers.remove(&(at, i));
        }
        self.free.push(i);
        self.saturated = false;
        slot
    }

    /// Brings the indexes in line with slot `i`'s breaker: timer, LRU membership, group
    /// isolation count.
    fn sync(&mut self, i: u32, now: MonoTime) {
        let slot = self.slots[i as usize].as_mut().expect("occupied slot");
        let deadline = slot.breaker.deadline(self.rules.policy(slot.policy));
        if deadline != slot.timer {
            if let Some(at) = slot.timer {
                self.timers.remove(&(at, i));
            }
            if let Some(at) = deadline {
                self.timers.insert((at, i));
            }
            slot.timer = deadline;
        }
        self.eviction.place(
            i,
            slot.breaker.is_evictable(),
            slot.breaker.has_failure_history(),
            now,
        );
        let isolating = slot.breaker.is_isolating();
        if isolating != slot.counted_isolated {
            slot.counted_isolated = isolating;
            if let Some(group) = slot.group {
                let group = &mut self.groups[usize::from(group)];
                if isolating {
                    group.isolated += 1;
                } else {
                    group.isolated -= 1;
                }
            }
        }
    }

    /// Recomputes group counts, activity and timers after a reload changed the policies,
    /// groups or windows.
    fn rebuild_indexes(&mut self, now: MonoTime) {
        let window = self.tracking.activity_window;
        self.node_activity = Activity::default();
        self.timers.clear();
        for i in 0..self.slots.len() as u32 {
            let Some(slot) = self.slots[i as usize].as_mut() else {
                continue;
            };
            slot.timer = None;
            slot.counted_isolated = false;
            slot.activity.active =
                slot.activity.active && slot.activity.last_signal.saturating_add(window) > now;
            let (group, mark) = (slot.group, slot.activity);
            if let Some(group) = group {
                self.groups[usize::from(group)].members += 1;
            }
            self.count_activity(group, ActivityMark::default(), mark);
            self.sync(i, now);
        }
        self.rebuild_active_by_signal();
    }
}

/// Memory per tracked upstream besides its window: slot, index bucket, LRU and activity
/// list links, and timer.
///
/// The slots, lists and index are arrays that double when full, so they hold up to twice
/// what they use: counted at their average over fleet sizes, 2 ln 2 ≈ 1.39 times (the
/// index also keeps an eighth of its buckets free).
pub(crate) fn fixed_bytes_per_upstream() -> usize {
    // The eviction order keeps two lists over the slots (see [`EvictionOrder`]).
    let per_slot = size_of::<Option<Slot>>()
        + 2 * LruList::<MonoTime>::BYTES_PER_SLOT
        + LruList::<()>::BYTES_PER_SLOT;
    let per_index_entry = SlotIndex::BYTES_PER_ENTRY * 8 / 7;
    let doubling_slack = 2.0 * std::f64::consts::LN_2;
    ((per_slot + per_index_entry) as f64 * doubling_slack) as usize + size_of::<(MonoTime, u32)>()
}

/// Reads the upstream of an indexed slot, for [`SlotIndex`]'s key comparisons.
fn upstream_of(slots: &[Option<Slot>]) -> impl Fn(u32) -> SocketAddr + '_ {
    |i| {
        slots[i as usize]
            .as_ref()
            .expect("indexed slots are occupied")
            .upstream
    }
}

fn group_states(config: &EngineConfig) -> Vec<GroupState> {
    config
        .groups
        .iter()
        .map(|group| {
            let guard = config.group_guard(group);
            GroupState {
                name: group.name.as_str().into(),
                max_ejection: group.max_ejection_percent,
                always_eject_one: group.always_eject_one,
                guard,
                members: 0,
                isolated: 0,
                activity: Activity::default(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usual_outcome_touches_two_cache_lines_of_its_slot() {
        assert_eq!(align_of::<Slot>(), 64);
        assert!(std::mem::offset_of!(Slot, breaker) + Breaker::HOT_BYTES <= 128);
        // None lives in the first cache line (in `timer`'s tag), read by every lookup.
        assert_eq!(size_of::<Option<Slot>>(), size_of::<Slot>());
        // Five cache lines: the slots are most of the memory per upstream.
        assert!(size_of::<Slot>() <= 320);
    }
}
