//! Where an upstream belongs under a configuration: its policy, its group, or the
//! never-isolate list (the rules are documented in [`crate::settings`] and the agent's configuration).
//!
//! Placing an upstream scans the rules once, when its breaker is created (and on reload);
//! resolved policies are shared between upstreams that match the same layers.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use super::{
    BreakerPolicy, Layered, PolicyPatch, Selector,
    selector::{Cidr, Specificity, match_pair},
};
use crate::settings::EngineConfig;

/// Index of a resolved policy in [`Rules::policy`].
pub type PolicyId = u32;
/// Index of a group in the configuration's `groups`.
pub type GroupId = u16;

/// Where an upstream belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub policy: PolicyId,
    pub group: Option<GroupId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LayerKind {
    // Declared in precedence order: at equal specificity an override beats a group.
    Group(GroupId),
    Override,
}

/// One (block, port) of one group or override.
#[derive(Clone, Debug)]
struct Layer {
    cidr: Cidr,
    port: Option<u16>,
    kind: LayerKind,
    /// Into `patches`; `None` when the rule sets no policy field.
    patch: Option<u32>,
}

impl Layer {
    fn matches(&self, upstream: SocketAddr) -> Option<Specificity> {
        match_pair(self.cidr, self.port, upstream)
    }
}

#[derive(Clone, Debug)]
pub struct Rules {
    layers: Vec<Layer>,
    patches: Vec<PolicyPatch>,
    never_isolate: Vec<Selector>,
    /// `[0]` is the defaults; the rest are resolved on demand.
    policies: Vec<BreakerPolicy>,
    /// Patch sequences (least specific first) already resolved.
    resolved: HashMap<Vec<u32>, PolicyId>,
}

impl Rules {
    pub const DEFAULTS: PolicyId = 0;

    pub fn compile(config: &EngineConfig) -> Self {
        let mut layers = Vec::new();
        let mut patches = Vec::new();
        let mut add = |selectors: &[Selector], kind, patch: &PolicyPatch| {
            let patch = (*patch != PolicyPatch::default()).then(|| {
                patches.push(patch.clone());
                patches.len() as u32 - 1
            });
            for selector in selectors {
                layers.extend(selector.pairs().map(|(cidr, port)| Layer {
                    cidr,
                    port,
                    kind,
                    patch,
                }));
            }
        };
        for (i, group) in config.groups.iter().enumerate() {
            let id = GroupId::try_from(i).expect("fewer than 65536 groups");
            add(&group.upstreams, LayerKind::Group(id), &group.policy);
        }
        for rule in &config.overrides {
            add(&rule.upstreams, LayerKind::Override, &rule.policy);
        }
        Self {
            layers,
            patches,
            never_isolate: config.never_isolate.upstreams.clone(),
            policies: vec![config.defaults.clone()],
            resolved: HashMap::new(),
        }
    }

    pub fn policy(&self, id: PolicyId) -> &BreakerPolicy {
        &self.policies[id as usize]
    }

    pub fn defaults(&self) -> &BreakerPolicy {
        self.policy(Self::DEFAULTS)
    }

    pub fn is_never_isolated(&self, upstream: SocketAddr) -> bool {
        self.never_isolate
            .iter()
            .any(|selector| selector.matches(upstream).is_some())
    }

    /// The ports of `host` that are never isolated, which a whole-host verdict must spare
    /// (a rule for any port of `host` refuses the whole-host verdict instead).
    pub fn never_isolated_ports(&self, host: IpAddr) -> BTreeSet<u16> {
        self.never_isolate
            .iter()
            .filter(|selector| selector.cidr.contains(host))
            .flat_map(|selector| selector.ports.iter().copied())
            .collect()
    }

    /// Where `upstream` belongs; `None` when it must never be isolated.
    pub fn place(&mut self, upstream: SocketAddr) -> Option<Placement> {
        if self.is_never_isolated(upstream) {
            return None;
        }
        let mut matching: Vec<(Specificity, LayerKind, Option<u32>)> = self
            .layers
            .iter()
            .filter_map(|layer| Some((layer.matches(upstream)?, layer.kind, layer.patch)))
            .collect();
        matching.sort_unstable();
        let group = matching.iter().rev().find_map(|&(_, kind, _)| match kind {
            LayerKind::Group(id) => Some(id),
            LayerKind::Override => None,
        });
        // Least specific first; a patch matched twice (overlapping blocks of one rule) applies
        // at its most specific position.
        let mut sequence: Vec<u32> = Vec::with_capacity(matching.len());
        for patch in matching.iter().filter_map(|&(_, _, patch)| patch) {
            sequence.retain(|&p| p != patch);
            sequence.push(patch);
        }
        Some(Placement {
            policy: self.resolve(sequence),
            group,
        })
    }

    fn resolve(&mut self, sequence: Vec<u32>) -> PolicyId {
        if sequence.is_empty() {
            return Self::DEFAULTS;
        }
        if let Some(&id) = self.resolved.get(&sequence) {
            return id;
        }
        let mut policy = self.defaults().clone();
        for &patch in &sequence {
            policy.apply(&self.patches[patch as usize]);
        }
        let id = PolicyId::try_from(self.policies.len()).expect("policy count fits u32");
        self.policies.push(policy);
        self.resolved.insert(sequence, id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mode;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rules(toml: &str) -> Rules {
        Rules::compile(&crate::settings::from_toml(toml))
    }

    const LAYERED: &str = r#"
[defaults]
failure_threshold = 5
half_open_probes = 2

[[groups]]
name = "wide"
upstreams = [{ cidr = "10.0.0.0/8" }]
[groups.policy]
failure_threshold = 7
open_duration = "1m"

[[groups]]
name = "web"
upstreams = [{ cidr = "10.1.0.0/16", ports = [443] }]

[[overrides]]
upstreams = [{ cidr = "10.0.0.0/8" }]
policy = { half_open_probes = 4, failure_threshold = 6 }

[[overrides]]
upstreams = [{ cidr = "10.1.0.0/16" }]
policy = { failure_threshold = 9 }
"#;

    #[test]
    fn the_most_specific_layer_wins_field_by_field() {
        let mut rules = rules(LAYERED);
        // 10.1.2.3:443: layers /8 group, /8 override, /16 override, /16:443 group (no
        // policy). Least to most specific: the /16 override sets the threshold last.
        let placed = rules.place(addr("10.1.2.3:443")).unwrap();
        assert_eq!(placed.group, Some(1));
        let policy = rules.policy(placed.policy);
        assert_eq!(policy.failure_threshold, 9);
        assert_eq!(policy.half_open_probes, 4);
        assert_eq!(policy.open_duration.as_secs(), 60);
        // At equal specificity (/8, any port) the override beats the group.
        let placed = rules.place(addr("10.9.0.1:80")).unwrap();
        assert_eq!(placed.group, Some(0));
        assert_eq!(rules.policy(placed.policy).failure_threshold, 6);
        // Outside every rule: the defaults.
        let placed = rules.place(addr("192.0.2.1:80")).unwrap();
        assert_eq!(
            placed,
            Placement {
                policy: Rules::DEFAULTS,
                group: None
            }
        );
    }

    #[test]
    fn resolved_policies_are_shared() {
        let mut rules = rules(LAYERED);
        let a = rules.place(addr("10.1.2.3:443")).unwrap();
        let b = rules.place(addr("10.1.9.9:443")).unwrap();
        assert_eq!(a, b);
        assert_eq!(rules.policies.len(), 2);
    }

    #[test]
    fn never_isolated_upstreams_have_no_place() {
        let mut rules = rules(
            "[[overrides]]\nupstreams = [{ cidr = \"0.0.0.0/0\" }]\npolicy = { mode = \"disabled\" }\n",
        );
        assert_eq!(rules.place(addr("10.0.0.10:53")), None);
        assert_eq!(rules.place(addr("[::ffff:10.0.0.10]:53")), None);
        let placed = rules.place(addr("10.0.0.10:5353")).unwrap();
        assert_eq!(rules.policy(placed.policy).mode, Mode::Disabled);
    }
}
