//! Prometheus metrics (prometheus-client), scraped from the agent's HTTP endpoint.
//!
//! Per-upstream series are capped: past `upstream_label_cap` distinct upstreams, new ones
//! are not labelled (counted in `circuit_metrics_upstreams_unlabelled_total` instead), so a
//! node talking to millions of addresses cannot blow up the time-series database.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use circuit_common::{ConnectOutcome, Stat};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    engine::{
        Activity, BreakerState, Breakers, Clock, ManagerStats, ServiceState, Transition,
        outcome_name,
    },
    kernel::Stats,
    surfaces::control::EventScope,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: String,
    to: String,
    reason: String,
    /// `node` or `client` (a client's own hold).
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CgroupLabel {
    cgroup: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineEventLabel {
    event: &'static str,
}

/// A panic guard: the node's (`scope="node"`, `group=""`), or a group's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabel {
    scope: &'static str,
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardCountLabels {
    scope: &'static str,
    group: String,
    /// `active` (a success or failure lately) or `failing` (failing for the node).
    upstreams: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
    /// `tracked`, or `isolated` (OPEN, HALF_OPEN or forced open).
    upstreams: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    /// `known` (learned from the NAT), or `isolated` (OPEN, HALF_OPEN or forced open).
    endpoints: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

pub struct Metrics {
    registry: Registry,
    service_endpoints: Family<ServiceLabels, Gauge>,
    service_state: Family<ServiceLabel, Gauge>,
    /// The services [`Metrics::engine_state`] last exported.
    services_seen: Mutex<HashSet<String>>,
    breaker_state: Family<UpstreamLabel, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    outcomes: Family<OutcomeLabel, Counter>,
    tracked_upstreams: Gauge,
    priority_cgroups: Family<CgroupLabel, Gauge>,
    detect_to_verdict: Histogram,
    unlabelled: Counter,
    engine_events: Family<EngineEventLabel, Counter>,
    guard_panicking: Family<GuardLabel, Gauge>,
    guard_upstreams: Family<GuardCountLabels, Gauge>,
    group_upstreams: Family<GroupLabels, Gauge>,
    engine_memory: Gauge,
    /// The groups [`Metrics::engine_state`] last exported.
    groups_seen: Mutex<HashSet<String>>,
    /// The engine's totals at the last [`Metrics::engine_stats`].
    engine_seen: Mutex<ManagerStats>,
    labelled: Mutex<HashSet<SocketAddr>>,
    upstream_label_cap: usize,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Numeric value of a state in `circuit_breaker_state` (documented in its help text).
pub fn state_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
        BreakerState::ForcedOpen => 3,
        BreakerState::Disabled => 4,
        BreakerState::MetricsOnly => 5,
    }
}

impl Metrics {
    /// The agent's metrics; `kernel` adds the kernel programs' counters, read at scrape time
    /// (None: the engine's alone, as in the daemon's unit tests).
    pub fn new(kernel: Option<Stats>, upstream_label_cap: usize) -> Self {
        let mut registry = Registry::with_prefix("circuit");
        let breaker_state = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "breaker_state",
            "Breaker state per upstream: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled, 5 metrics-only",
            breaker_state.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "transitions",
            "Breaker state changes by from, to and reason",
            transitions.clone(),
        );
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "outcomes",
            "Connection outcomes received from the kernel, by kind",
            outcomes.clone(),
        );
        let tracked_upstreams = Gauge::default();
        registry.register(
            "tracked_upstreams",
            "Upstreams with a breaker in the agent",
            tracked_upstreams.clone(),
        );
        let priority_cgroups = Family::<CgroupLabel, Gauge>::default();
        registry.register(
            "priority_cgroup_resolved",
            "Configured priority cgroups: 1 while the path names a cgroup (exempt), 0 while it does not",
            priority_cgroups.clone(),
        );
        let detect_to_verdict = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "detect_to_verdict_seconds",
            "Time from the kernel event that crossed a threshold to the verdict being written",
            detect_to_verdict.clone(),
        );
        let unlabelled = Counter::default();
        registry.register(
            "metrics_upstreams_unlabelled",
            "Upstreams left out of per-upstream series because of the label cap",
            unlabelled.clone(),
        );
        let engine_events = Family::<EngineEventLabel, Counter>::default();
        registry.register(
            "engine_events",
            "What the engine did with its breakers: created, evicted_idle, evicted_for_room, evictions_refused (a client spent its eviction budget), untracked_outcomes (the bound held only OPEN or held breakers), never_isolated_outcomes, suppressed_trips, client_holds",
            engine_events.clone(),
        );
        let guard_panicking = Family::<GuardLabel, Gauge>::default();
        registry.register(
            "panic_guard_suppressing",
            "1 while a panic guard (the node's, or a group's) suppresses trips: too many of its active upstreams fail at once",
            guard_panicking.clone(),
        );
        let guard_upstreams = Family::<GuardCountLabels, Gauge>::default();
        registry.register(
            "panic_guard_upstreams",
            "Upstreams a panic guard counts: active (an outcome within tracking.activity_window) and failing (failing for the node)",
            guard_upstreams.clone(),
        );
        let group_upstreams = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_upstreams",
            "A group's tracked upstreams, and of them the isolated ones (its max_ejection_percent caps those)",
            group_upstreams.clone(),
        );
        let service_endpoints = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "service_endpoints",
            "A service's endpoints (learned from its NAT), and of them the isolated ones",
            service_endpoints.clone(),
        );
        let service_state = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "service_state",
            "A service's state, derived from its endpoints: 0 healthy, 1 degraded (connects re-routed), 2 open (every endpoint isolated)",
            service_state.clone(),
        );
        let engine_memory = Gauge::default();
        registry.register(
            "engine_memory_bytes",
            "Heap the breakers and their indexes hold",
            engine_memory.clone(),
        );
        if let Some(stats) = kernel {
            registry.register_collector(Box::new(KernelStats {
                stats: Mutex::new(stats),
            }));
        }
        Self {
            registry,
            service_endpoints,
            service_state,
            services_seen: Mutex::new(HashSet::new()),
            breaker_state,
            transitions,
            outcomes,
            tracked_upstreams,
            priority_cgroups,
            detect_to_verdict,
            unlabelled,
            engine_events,
            guard_panicking,
            guard_upstreams,
            group_upstreams,
            engine_memory,
            groups_seen: Mutex::new(HashSet::new()),
            engine_seen: Mutex::new(ManagerStats::default()),
            labelled: Mutex::new(HashSet::new()),
            upstream_label_cap,
        }
    }

    /// Whether `upstream` may have its own series (within the cap).
    fn labelled(&self, upstream: SocketAddr) -> bool {
        let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
        if labelled.contains(&upstream) {
            return true;
        }
        if labelled.len() >= self.upstream_label_cap {
            self.unlabelled.inc();
            return false;
        }
        labelled.insert(upstream)
    }

    pub fn outcome(&self, outcome: ConnectOutcome) {
        self.outcomes
            .get_or_create(&OutcomeLabel {
                kind: outcome_name(outcome).to_owned(),
            })
            .inc();
    }

    pub fn transition(&self, t: &Transition, detect_to_verdict: Option<Duration>) {
        self.transitions
            .get_or_create(&TransitionLabels {
                from: t.change.from.to_string(),
                to: t.change.to.to_string(),
                reason: t.change.reason.kind().to_owned(),
                scope: EventScope::of(t).as_str().to_owned(),
            })
            .inc();
        // A client's own hold says nothing of the upstream's state for everyone else.
        if t.client.is_none() && self.labelled(t.upstream) {
            self.breaker_state
                .get_or_create(&UpstreamLabel {
                    upstream: t.upstream.to_string(),
                })
                .set(state_value(t.change.to));
        }
        if let Some(d) = detect_to_verdict {
            self.detect_to_verdict.observe(d.as_secs_f64());
        }
    }

    /// The configured priority cgroups and whether each resolves now; replaces the last set.
    pub fn set_priority_cgroups(&self, cgroups: &[crate::kernel::PriorityCgroup]) {
        self.priority_cgroups.clear();
        for cgroup in cgroups {
            let label = CgroupLabel {
                cgroup: cgroup.path.display().to_string(),
            };
            self.priority_cgroups
                .get_or_create(&label)
                .set(i64::from(cgroup.id.is_some()));
        }
    }

    pub fn set_tracked(&self, n: usize) {
        self.tracked_upstreams.set(n as i64);
    }

    /// The engine's standing figures: its panic guards, groups and memory. Series are
    /// overwritten in place (a scrape never finds them missing); those of groups a reload
    /// removed are removed.
    pub fn engine_state<C: Clock>(&self, breakers: &Breakers<C>) {
        let guard = |scope: &'static str, group: &str, activity: Activity, panicking: bool| {
            let label = GuardLabel {
                scope,
                group: group.to_owned(),
            };
            self.guard_panicking
                .get_or_create(&label)
                .set(i64::from(panicking));
            for (upstreams, n) in [("active", activity.active), ("failing", activity.failing)] {
                self.guard_upstreams
                    .get_or_create(&GuardCountLabels {
                        scope,
                        group: group.to_owned(),
                        upstreams,
                    })
                    .set(i64::from(n));
            }
        };
        let (activity, panicking) = breakers.node_activity();
        guard("node", "", activity, panicking);
        let mut groups = HashSet::new();
        for group in breakers.groups() {
            guard("group", group.name, group.activity, group.panicking);
            for (upstreams, n) in [("tracked", group.members), ("isolated", group.isolated)] {
                self.group_upstreams
                    .get_or_create(&GroupLabels {
                        group: group.name.to_owned(),
                        upstreams,
                    })
                    .set(i64::from(n));
            }
            groups.insert(group.name.to_owned());
        }
        let mut seen = self
            .groups_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in seen.difference(&groups) {
            let group = gone.clone();
            self.guard_panicking.remove(&GuardLabel {
                scope: "group",
                group: group.clone(),
            });
            for upstreams in ["active", "failing"] {
                self.guard_upstreams.remove(&GuardCountLabels {
                    scope: "group",
                    group: group.clone(),
                    upstreams,
                });
            }
            for upstreams in ["tracked", "isolated"] {
                self.group_upstreams.remove(&GroupLabels {
                    group: group.clone(),
                    upstreams,
                });
            }
        }
        *seen = groups;
        self.services(breakers);
        self.engine_memory.set(breakers.memory().bytes as i64);
    }

    /// Each service's endpoint counts and derived state; services forgotten lose theirs.
    fn services<C: Clock>(&self, breakers: &Breakers<C>) {
        let book = breakers.services();
        let mut services = HashSet::new();
        for service in book.services() {
            let name = service.to_string();
            let (mut known, mut isolated) = (0, 0);
            for endpoint in book.endpoints(&service) {
                known += 1;
                isolated += i64::from(breakers.isolates(&endpoint));
            }
            for (endpoints, n) in [("known", known), ("isolated", isolated)] {
                self.service_endpoints
                    .get_or_create(&ServiceLabels {
                        service: name.clone(),
                        endpoints,
                    })
                    .set(n);
            }
            let state = match breakers.service_state(&service) {
                ServiceState::Healthy => 0,
                ServiceState::Degraded => 1,
                ServiceState::Open => 2,
            };
            self.service_state
                .get_or_create(&ServiceLabel {
                    service: name.clone(),
                })
                .set(state);
            services.insert(name);
        }
        let mut seen = self
            .services_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in seen.difference(&services) {
            for endpoints in ["known", "isolated"] {
                self.service_endpoints.remove(&ServiceLabels {
                    service: gone.clone(),
                    endpoints,
                });
            }
            self.service_state.remove(&ServiceLabel {
                service: gone.clone(),
            });
        }
        *seen = services;
    }

    /// Brings the engine's counters up to its totals `now`; returns what happened since the
    /// last call.
    pub fn engine_stats(&self, now: &ManagerStats) -> ManagerStats {
        let mut seen = self
            .engine_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let since = |now: u64, then: u64| now.saturating_sub(then);
        let delta = ManagerStats {
            created: since(now.created, seen.created),
            evicted_idle: since(now.evicted_idle, seen.evicted_idle),
            evicted_for_room: since(now.evicted_for_room, seen.evicted_for_room),
            evictions_refused: since(now.evictions_refused, seen.evictions_refused),
            untracked_outcomes: since(now.untracked_outcomes, seen.untracked_outcomes),
            never_isolated_outcomes: since(
                now.never_isolated_outcomes,
                seen.never_isolated_outcomes,
            ),
            suppressed_trips: since(now.suppressed_trips, seen.suppressed_trips),
            notices_dropped: since(now.notices_dropped, seen.notices_dropped),
            client_holds: since(now.client_holds, seen.client_holds),
            unresolved_service_outcomes: since(
                now.unresolved_service_outcomes,
                seen.unresolved_service_outcomes,
            ),
        };
        for (event, n) in [
            ("created", delta.created),
            ("evicted_idle", delta.evicted_idle),
            ("evicted_for_room", delta.evicted_for_room),
            ("evictions_refused", delta.evictions_refused),
            ("untracked_outcomes", delta.untracked_outcomes),
            ("never_isolated_outcomes", delta.never_isolated_outcomes),
            ("suppressed_trips", delta.suppressed_trips),
            ("client_holds", delta.client_holds),
            (
                "unresolved_service_outcomes",
                delta.unresolved_service_outcomes,
            ),
        ] {
            let counter = self
                .engine_events
                .get_or_create(&EngineEventLabel { event });
            counter.inc_by(n);
        }
        *seen = *now;
        delta
    }

    /// Forgets an upstream's series (its breaker was evicted).
    pub fn forget(&self, upstream: SocketAddr) {
        let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
        if labelled.remove(&upstream) {
            self.breaker_state.remove(&UpstreamLabel {
                upstream: upstream.to_string(),
            });
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Reads the kernel's per-CPU counters at scrape time. Names are given without the
/// registry's `circuit_` prefix, which the registry adds to collectors too.
struct KernelStats {
    stats: Mutex<Stats>,
}

impl fmt::Debug for KernelStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelStats")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    point: &'static str,
    reason: &'static str,
}

impl Collector for KernelStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let Ok(values) = stats.all() else {
            return Ok(()); // the maps are gone (detached): nothing to report
        };
        let value = |s: Stat| values.iter().find(|(k, _)| *k == s).map_or(0, |(_, v)| *v);
        let rejects = [
            (Stat::XdpRejectOpen, "xdp", "open"),
            (Stat::XdpRejectProbeBudget, "xdp", "probe_budget"),
            (Stat::XdpRejectPartial, "xdp", "partial"),
            (Stat::TcRejectOpen, "tc", "open"),
            (Stat::TcRejectProbeBudget, "tc", "probe_budget"),
            (Stat::TcRejectPartial, "tc", "partial"),
            (Stat::CgroupRejectOpen, "cgroup", "open"),
            (Stat::CgroupRejectProbeBudget, "cgroup", "probe_budget"),
            (Stat::CgroupRejectPartial, "cgroup", "partial"),
        ];
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "rejects",
            "New connections rejected, by enforcement point and reason",
            None,
            counter.metric_type(),
        )?;
        for (stat, point, reason) in rejects {
            let labels = RejectLabels { point, reason };
            ConstCounter::new(value(stat)).encode(family.encode_family(&labels)?)?;
        }
        for (name, help, stat) in [
            (
                "probes_admitted",
                "Probe connections admitted in HALF_OPEN",
                Stat::ProbesAdmitted,
            ),
            (
                "ringbuf_drops",
                "Outcome events lost to a full ring buffer",
                Stat::OutcomeDrops,
            ),
            (
                "lease_expiries",
                "Lookups that found an expired verdict (fail-open)",
                Stat::LeaseExpired,
            ),
            (
                "dry_run_rejects",
                "Rejects a metrics-only verdict would have made",
                Stat::DryRunRejects,
            ),
            ("xdp_frames", "Frames seen by XDP", Stat::XdpFrames),
            (
                "parse_failures",
                "Malformed frames passed by XDP",
                Stat::XdpParseFailures,
            ),
            (
                "xdp_unjudged",
                "TCP frames XDP passed unjudged (a first fragment, or more IPv6 extension headers than it walks)",
                Stat::XdpUnjudged,
            ),
            (
                "tc_unjudged",
                "TCP frames TC passed unjudged (a first fragment, or more IPv6 extension headers than it walks)",
                Stat::TcUnjudged,
            ),
            (
                "xdp_resets_suppressed",
                "Rejected SYNs XDP dropped instead of answering: their source may not get a RST (broadcast, multicast, loopback, unspecified)",
                Stat::XdpResetsSuppressed,
            ),
            (
                "xdp_resets_rate_limited",
                "Rejected SYNs XDP dropped instead of answering: the CPU's RST budget was spent",
                Stat::XdpResetsRateLimited,
            ),
            (
                "outcomes_throttled",
                "Outcomes kept off the ring buffer because their client spent its budget (still counted per upstream)",
                Stat::OutcomesThrottled,
            ),
        ] {
            let c = ConstCounter::new(value(stat));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}
