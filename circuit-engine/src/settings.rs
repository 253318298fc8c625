//! The engine's configuration: bounds, the default policy, the panic guard, groups, overrides
//! and the never-isolate list. The agent's TOML file maps into [`EngineConfig`] through
//! [`EnginePatch`] (the same sections as written), and every semantic rule of these sections
//! is checked here, by [`EngineConfig::check`], with the path of the offending field so the
//! file's reader can point at it.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    time::Duration,
};

use serde::Deserialize;

use crate::{
    BreakerPolicy, Cidr, GuardPatch, GuardPolicy, Layered, Percent, PolicyPatch, Selector,
    WindowKind, estimated_bytes_per_upstream, layered_section,
    services::{ServicesConfig, ServicesPatch},
};

/// The breakers' share of the agent's memory (the DaemonSet's limit is 256 MiB): what
/// `max_upstreams` times the largest window may take.
pub const BREAKER_MEMORY_BUDGET: usize = 192 << 20;

layered_section! {
    /// Bounds on what the engine remembers.
    pub struct TrackingConfig / TrackingPatch {
        /// Most upstreams tracked at once. At the bound, the least recently active CLOSED
        /// breaker is dropped for a new upstream; OPEN, HALF_OPEN and manually held
        /// breakers are never dropped, and when only those are left the new upstream's
        /// outcomes are ignored (and counted) until one closes. Default 65536, the kernel's
        /// verdict map capacity (a few hundred bytes each).
        pub max_upstreams: u32 = 65_536,
        /// A CLOSED breaker with no outcome for this long is dropped (its learned state with
        /// it); an expiring HALF_OPEN breaker nobody tried to use for this long closes instead
        /// of re-opening. Default 10 min.
        pub idle_after: Duration = Duration::from_secs(600),
        /// An upstream counts as active for the panic guard while its last success or
        /// failure is at most this old. Default 10 s: Envoy's outlier-detection `interval`.
        pub activity_window: Duration = Duration::from_secs(10),
        /// At the bound, how many breakers one client (a cgroup) may push out per second,
        /// after a burst of ten seconds' worth; beyond, its new upstreams are not tracked
        /// (and counted). Breakers with no recent failure go first. Default 100: one
        /// process naming new upstreams cannot churn the others' partly failed breakers.
        pub client_evictions_per_second: u32 = 100,
    }
}

layered_section! {
    /// Upstreams that are never tracked nor isolated.
    pub struct NeverIsolateConfig / NeverIsolatePatch {
        /// Default: port 53 on every address (`0.0.0.0/0` and `::/0`): without DNS nothing
        /// on the node can find a healthy upstream either. Add the Kubernetes API server
        /// (e.g. `{ cidr = "10.96.0.1", ports = [443] }`): the node's agents need it.
        pub upstreams: Vec<Selector> = dns_everywhere(),
    }
}

fn dns_everywhere() -> Vec<Selector> {
    ["0.0.0.0/0", "::/0"]
        .map(|cidr| Selector {
            cidr: cidr.parse().expect("valid literal"),
            ports: vec![53],
        })
        .into()
}

const fn default_max_ejection_percent() -> Percent {
    Percent::new(10)
}

const fn default_always_eject_one() -> bool {
    true
}

/// A service: a set of upstreams whose isolation is capped together.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Unique, used in logs and metrics.
    pub name: String,
    /// Which upstreams belong to the group (most specific group wins).
    pub upstreams: Vec<Selector>,
    /// Never isolate more than this share of the group's tracked upstreams. Default 10:
    /// Envoy's `max_ejection_percent`.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: Percent,
    /// Allow one isolation whatever the percentage (Envoy's `always_eject_one_host`).
    /// Default true: with the strict 10 % cap a group of fewer than 10 upstreams could
    /// otherwise isolate none.
    #[serde(default = "default_always_eject_one")]
    pub always_eject_one: bool,
    /// The group's panic guard, over `[guard]`.
    #[serde(default)]
    pub guard: GuardPatch,
    /// Policy for the group's upstreams, over `[defaults]`.
    #[serde(default)]
    pub policy: PolicyPatch,
}

/// Policy for some upstreams, over `[defaults]` and their group's policy.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    pub upstreams: Vec<Selector>,
    pub policy: PolicyPatch,
}

/// Everything the engine is configured with, resolved (defaults filled in).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineConfig {
    pub tracking: TrackingConfig,
    /// The policy of every upstream no group or override says otherwise for.
    pub defaults: BreakerPolicy,
    /// The node-wide panic guard.
    pub guard: GuardPolicy,
    pub groups: Vec<GroupConfig>,
    pub overrides: Vec<OverrideConfig>,
    pub never_isolate: NeverIsolateConfig,
    pub services: ServicesConfig,
}

/// The engine's sections as a configuration file writes them: each a patch over the built-in
/// defaults.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnginePatch {
    #[serde(default)]
    pub tracking: TrackingPatch,
    #[serde(default)]
    pub defaults: PolicyPatch,
    #[serde(default)]
    pub guard: GuardPatch,
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    #[serde(default)]
    pub overrides: Vec<OverrideConfig>,
    #[serde(default)]
    pub never_isolate: NeverIsolatePatch,
    #[serde(default)]
    pub services: ServicesPatch,
}

/// `T`'s defaults with one layer applied.
pub fn patched<T: Layered + Default>(patch: &T::Patch) -> T {
    let mut value = T::default();
    value.apply(patch);
    value
}

impl EnginePatch {
    pub fn resolve(self) -> EngineConfig {
        EngineConfig {
            tracking: patched(&self.tracking),
            defaults: patched(&self.defaults),
            guard: patched(&self.guard),
            groups: self.groups,
            overrides: self.overrides,
            never_isolate: patched(&self.never_isolate),
            services: patched(&self.services),
        }
    }
}

impl EngineConfig {
    /// One policy for every upstream: no groups, nothing exempt, the default bounds and
    /// node panic guard.
    pub fn with_policy(policy: BreakerPolicy) -> Self {
        Self {
            defaults: policy,
            never_isolate: NeverIsolateConfig {
                upstreams: Vec::new(),
            },
            ..Self::default()
        }
    }

    /// The semantic checks of these sections; the error names the field.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        let tracking = &self.tracking;
        let at = |field: &str| FieldPath::key("tracking").then(field);
        if tracking.max_upstreams == 0 {
            return Err(InvalidSetting::new(
                at("max_upstreams"),
                "must be at least 1",
            ));
        }
        if tracking.client_evictions_per_second == 0 {
            return Err(InvalidSetting::new(
                at("client_evictions_per_second"),
                "must be at least 1",
            ));
        }
        if tracking.max_upstreams > circuit_common::VERDICTS_CAPACITY {
            return Err(InvalidSetting::new(
                at("max_upstreams"),
                format!(
                    "must be at most {}: the kernel holds that many verdicts",
                    circuit_common::VERDICTS_CAPACITY
                ),
            ));
        }
        for (field, d) in [
            ("idle_after", tracking.idle_after),
            ("activity_window", tracking.activity_window),
        ] {
            if d.is_zero() {
                return Err(InvalidSetting::new(at(field), "must be longer than 0s"));
            }
        }
        check_policy(&self.defaults, FieldPath::key("defaults"))?;
        check_guard(&self.guard, FieldPath::key("guard"))?;
        self.check_groups()?;
        self.check_overrides()?;
        self.check_memory()
    }

    fn check_groups(&self) -> Result<(), InvalidSetting> {
        let mut names = HashSet::new();
        let mut claims = Claims::default();
        for (i, group) in self.groups.iter().enumerate() {
            let at = FieldPath::key("groups").index(i);
            if group.name.is_empty() {
                return Err(InvalidSetting::new(at.then("name"), "must not be empty"));
            }
            if !names.insert(group.name.as_str()) {
                return Err(InvalidSetting::new(
                    at.then("name"),
                    format!("another group is already named {:?}", group.name),
                ));
            }
            claims.claim(i, &group.upstreams, &at, |other| {
                format!(
                    "is already in group {:?}; an upstream belongs to one group",
                    self.groups[other].name
                )
            })?;
            check_guard(&self.group_guard(group), at.then("guard"))?;
            check_policy(&self.policy_with(&group.policy), at.then("policy"))?;
        }
        Ok(())
    }

    fn check_overrides(&self) -> Result<(), InvalidSetting> {
        let mut claims = Claims::default();
        for (i, rule) in self.overrides.iter().enumerate() {
            let at = FieldPath::key("overrides").index(i);
            claims.claim(i, &rule.upstreams, &at, |other| {
                format!("is already set by overrides[{other}]; merge the two")
            })?;
            check_policy(&self.policy_with(&rule.policy), at.then("policy"))?;
        }
        Ok(())
    }

    /// Every tracked upstream may come to hold the largest window the layers can combine
    /// into (one layer may turn a detector on, another size the window): the product must
    /// fit the breakers' share of the agent's memory.
    fn check_memory(&self) -> Result<(), InvalidSetting> {
        let layers: Vec<BreakerPolicy> = self
            .groups
            .iter()
            .map(|g| &g.policy)
            .chain(self.overrides.iter().map(|o| &o.policy))
            .map(|patch| self.policy_with(patch))
            .chain([self.defaults.clone()])
            .collect();
        let mut worst = self.defaults.clone();
        worst.failure_rate.enabled = layers.iter().any(BreakerPolicy::needs_window);
        worst.window.calls = layers.iter().map(|p| p.window.calls).max().unwrap_or(0);
        worst.window.buckets = layers.iter().map(|p| p.window.buckets).max().unwrap_or(0);
        let largest = [WindowKind::Count, WindowKind::Time]
            .into_iter()
            .map(|kind| {
                worst.window.kind = kind;
                estimated_bytes_per_upstream(&worst)
            })
            .max()
            .unwrap_or(0);
        let max_upstreams = self.tracking.max_upstreams as usize;
        let total = max_upstreams.saturating_mul(largest);
        if total > BREAKER_MEMORY_BUDGET {
            return Err(InvalidSetting::new(
                FieldPath::key("tracking").then("max_upstreams"),
                format!(
                    "{max_upstreams} upstreams of up to {largest} bytes each (the largest window configured) need {} MiB, more than the {} MiB the breakers may use: lower max_upstreams or the windows' calls or buckets",
                    total.div_ceil(1 << 20),
                    BREAKER_MEMORY_BUDGET >> 20
                ),
            ));
        }
        Ok(())
    }

    /// `[defaults]` with one layer applied. Every policy check is per field, so a layer that
    /// is valid over the defaults is valid over any other valid layers too.
    fn policy_with(&self, patch: &PolicyPatch) -> BreakerPolicy {
        let mut policy = self.defaults.clone();
        policy.apply(patch);
        policy
    }

    /// A group's panic guard: `[guard]` with the group's own layer applied.
    pub fn group_guard(&self, group: &GroupConfig) -> GuardPolicy {
        let mut guard = self.guard.clone();
        guard.apply(&group.guard);
        guard
    }
}

/// Which rule claimed each (block, port), to refuse the same pair in two rules of a kind.
#[derive(Default)]
struct Claims(HashMap<(Cidr, Option<u16>), usize>);

impl Claims {
    /// Claims the `upstreams` of rule `rule` (found at `at`); `taken(other)` says why a pair
    /// rule `other` claimed first cannot be claimed again.
    fn claim(
        &mut self,
        rule: usize,
        upstreams: &[Selector],
        at: &FieldPath,
        taken: impl Fn(usize) -> String,
    ) -> Result<(), InvalidSetting> {
        if upstreams.is_empty() {
            return Err(InvalidSetting::new(
                at.then("upstreams"),
                "must name at least one upstream block",
            ));
        }
        for (j, selector) in upstreams.iter().enumerate() {
            for pair in selector.pairs() {
                match self.0.insert(pair, rule) {
                    Some(other) if other != rule => {
                        let (cidr, port) = pair;
                        let port = port.map_or("any port".to_owned(), |p| format!("port {p}"));
                        return Err(InvalidSetting::new(
                            at.then("upstreams").index(j),
                            format!("{cidr} {port} {}", taken(other)),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn check_policy(policy: &BreakerPolicy, at: FieldPath) -> Result<(), InvalidSetting> {
    policy
        .validate()
        .map_err(|err| InvalidSetting::new(at.then_dotted(err.field), err.message))
}

fn check_guard(guard: &GuardPolicy, at: FieldPath) -> Result<(), InvalidSetting> {
    if guard.min_active == 0 {
        return Err(InvalidSetting::new(
            at.then("min_active"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// A semantic error at a field of the configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct InvalidSetting {
    pub path: FieldPath,
    pub message: String,
}

impl InvalidSetting {
    pub fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// Where a value is in the document, e.g. `groups[0].policy.window.buckets`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<PathSegment>);

impl FieldPath {
    pub fn key(key: &str) -> Self {
        Self(vec![PathSegment::Key(key.to_owned())])
    }

    pub fn then(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.push(PathSegment::Key(key.to_owned()));
        path
    }

    /// Appends a dotted key path such as `window.buckets`.
    pub fn then_dotted(&self, keys: &str) -> Self {
        keys.split('.')
            .fold(self.clone(), |path, key| path.then(key))
    }

    pub fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.push(PathSegment::Index(index));
        path
    }

    pub fn push(&mut self, segment: PathSegment) {
        self.0.push(segment);
    }

    pub fn pop(&mut self) -> Option<PathSegment> {
        self.0.pop()
    }

    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Key(key) if i == 0 => f.write_str(key)?,
                PathSegment::Key(key) => write!(f, ".{key}")?,
                PathSegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Test configurations written as the file writes the engine's sections.
#[cfg(test)]
pub(crate) fn from_toml(text: &str) -> EngineConfig {
    let config = toml::from_str::<EnginePatch>(text)
        .expect("valid engine sections")
        .resolve();
    config.check().expect("a valid configuration");
    config
}
