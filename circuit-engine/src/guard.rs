//! The panic (correlation) guard and the group ejection cap: the checks a wanted trip must
//! pass, and why it was suppressed when it does not.
//!
//! When failures spike across most of the upstreams that are in use at once, the likely
//! cause is the node's own network, not all of them failing together: isolating them would
//! turn a blip into an outage. So a scope (the whole node, and each group) in which more than
//! `failing_percent` of the active upstreams are failing suppresses new trips; breakers that
//! are already open carry on. An upstream is *active* while its last success or failure is at
//! most `tracking.activity_window` old, and *failing* while that last outcome was a failure
//! that would isolate it for the node (`min_witnesses` clients, nobody contradicting): one
//! client failing everywhere cannot spend the guard for the others. Failures at an upstream
//! nobody has connected to (a port scan) are not activity at all.

use std::{fmt, net::SocketAddr, sync::Arc};

use super::{breaker::Reason, policy::layered_section, units::Percent};
use crate::clock::MonoTime;

layered_section! {
    /// The panic guard of a scope: the node (`[guard]`) or a group (`[groups.guard]`, over
    /// the node's values).
    pub struct GuardPolicy / GuardPatch {
        /// Default true: suppressing trips during a node-wide spike is the safe side.
        pub enabled: bool = true,
        /// Suppress new trips when more than this share of the active upstreams is failing.
        /// Default 50: Envoy's panic threshold (panic below 50 % healthy).
        pub failing_percent: Percent = Percent::new(50),
        /// Active upstreams the scope needs before the guard judges it. Default 5: Envoy's
        /// `success_rate_minimum_hosts`; with fewer, one failing upstream is a large share.
        pub min_active: u32 = 5,
    }
}

/// Active and failing upstreams in one scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    pub active: u32,
    pub failing: u32,
}

impl Activity {
    pub fn panics(&self, guard: &GuardPolicy) -> bool {
        guard.enabled
            && self.active >= guard.min_active
            && guard
                .failing_percent
                .is_exceeded_by(self.failing.into(), self.active.into())
    }
}

/// Where a panic guard looked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardScope {
    Node,
    Group(Arc<str>),
}

impl fmt::Display for GuardScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuardScope::Node => f.write_str("the node"),
            GuardScope::Group(name) => write!(f, "group {name}"),
        }
    }
}

/// Why a wanted trip did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuppressionCause {
    /// The group already isolates as many upstreams as `max_ejection_percent` allows.
    MaxEjection {
        group: Arc<str>,
        isolated: u32,
        members: u32,
        max: Percent,
    },
    /// Failures spiked across the scope: likely not this upstream's fault.
    Panic {
        scope: GuardScope,
        failing: u32,
        active: u32,
        threshold: Percent,
    },
}

impl fmt::Display for SuppressionCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuppressionCause::MaxEjection {
                group,
                isolated,
                members,
                max,
            } => write!(
                f,
                "group {group} already isolates {isolated} of {members} upstreams (max {max})"
            ),
            SuppressionCause::Panic {
                scope,
                failing,
                active,
                threshold,
            } => write!(
                f,
                "panic guard: {failing} of {active} active upstreams in {scope} are failing \
                 (more than {threshold}), likely the node's own network"
            ),
        }
    }
}

/// A trip a detector wanted and a guard stopped; reported once until the detectors stop
/// firing for the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suppressed {
    pub upstream: SocketAddr,
    pub at: MonoTime,
    /// What the breaker would have tripped on.
    pub wanted: Reason,
    pub cause: SuppressionCause,
    /// The breaker is METRICS_ONLY: its trip would have been a dry run anyway.
    pub dry_run: bool,
}

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trip of {} on {} suppressed: {}",
            self.upstream, self.wanted, self.cause
        )
    }
}

/// The group ejection cap, Envoy's strict form (PR #27909): isolating one more must keep the
/// isolated share at or under `max`; `always_eject_one` allows one isolation in any group
/// (Envoy's `always_eject_one_host`).
pub fn may_isolate_another(
    isolated: u32,
    members: u32,
    max: Percent,
    always_eject_one: bool,
) -> bool {
    (always_eject_one && isolated == 0)
        || (members > 0 && !max.is_exceeded_by(u64::from(isolated) + 1, members.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_needs_volume_and_a_majority() {
        let guard = GuardPolicy::default();
        let judge = |failing, active| Activity { active, failing }.panics(&guard);
        assert!(!judge(4, 4), "below min_active");
        assert!(!judge(3, 6), "exactly half is not more than half");
        assert!(judge(4, 6));
        let off = GuardPolicy {
            enabled: false,
            ..guard
        };
        assert!(
            !Activity {
                active: 10,
                failing: 10
            }
            .panics(&off)
        );
    }

    #[test]
    fn ejection_cap_is_strict_unless_one_is_always_allowed() {
        let ten = Percent::new(10);
        // Envoy's strict 10 %: a group of 5 can isolate none, unless one is always allowed.
        assert!(!may_isolate_another(0, 5, ten, false));
        assert!(may_isolate_another(0, 5, ten, true));
        assert!(!may_isolate_another(1, 5, ten, true));
        assert!(may_isolate_another(0, 10, ten, false));
        assert!(!may_isolate_another(1, 10, ten, false));
        assert!(may_isolate_another(1, 20, ten, false));
        assert!(!may_isolate_another(0, 0, ten, false));
    }
}
