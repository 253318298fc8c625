//! The agent's configuration: one TOML file (see [`EXAMPLE_CONFIG`], which is the complete
//! default configuration with every field explained).
//!
//! Sections: `[agent]` (what the daemon attaches and where), `[tracking]` (memory bounds),
//! `[defaults]` (the breaker policy of every upstream), `[guard]` (the node's panic guard),
//! `[[groups]]` (services: sets of CIDRs and ports with an ejection cap and a panic guard),
//! `[[overrides]]` (policy for some upstreams), `[never_isolate]` and `[priority]`.
//!
//! # Which policy an upstream gets
//!
//! Every group and override whose `upstreams` match an upstream is a *layer*; the policy is
//! `[defaults]` with those layers' `policy` tables applied from the least to the most
//! specific, so the most specific layer wins field by field. Specificity: a longer CIDR prefix
//! wins; at equal prefix length an exact port beats any port; at equal specificity an
//! override beats a group. The same block and port may not appear in two groups, nor in two
//! overrides (it would be ambiguous). An upstream belongs to the most specific group that
//! matches it. Upstreams on the never-isolate list are never tracked nor isolated, whatever
//! else matches them.
//!
//! # Errors
//!
//! [`ConfigError`] names the file, the line and column, the field and the reason, e.g.
//! `circuit.toml:12:24: groups[0].max_ejection_percent: must be between 0 and 100, got 140`.
//! Syntax errors, unknown fields, wrong types and semantic checks all report a position.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

use crate::kernel::{Enforcer, XdpModeChoice};
use toml::de::{DeTable, DeValue};

pub use crate::engine::{
    BREAKER_MEMORY_BUDGET, EngineConfig, EnginePatch, FieldPath, GroupConfig, InvalidSetting,
    NeverIsolateConfig, OverrideConfig, PathSegment, ServicesPatch, TrackingConfig,
};
use crate::engine::{
    GuardPatch, NeverIsolatePatch, PolicyPatch, TrackingPatch, layered_leaves, layered_section,
    settings::patched,
};

layered_leaves!(XdpModeChoice => XdpModeChoice);

layered_section! {
    /// What the daemon attaches, and where.
    pub struct AgentConfig / AgentPatch {
        /// Interfaces for the XDP (ingress) and TC (egress) enforcement points. Default
        /// none: cgroup enforcement needs no interface, and which interfaces carry the
        /// clients' SYNs depends on the node.
        pub interfaces: Vec<String> = Vec::new(),
        /// `auto`, `native` or `generic`. Default `auto`: native XDP, except generic on veth
        /// (native XDP_TX on veth drops frames unless the peer has an XDP program) and where
        /// the driver lacks native support.
        pub xdp_mode: XdpModeChoice = XdpModeChoice::Auto,
        /// bpffs directory for the pinned maps and links, one per agent. Default
        /// `/sys/fs/bpf/circuit`.
        pub pin_dir: PathBuf = PathBuf::from("/sys/fs/bpf/circuit"),
        /// How long the kernel keeps enforcing a verdict the agent stops renewing (renewed
        /// every third of it). Default 15 s: a dead agent can never blackhole traffic for
        /// longer.
        pub lease: Duration = Duration::from_secs(15),
        /// Enforcement points, from `cgroup`, `xdp` and `tc`. Default `["cgroup", "xdp"]`:
        /// cgroup covers every process on the node including host-network ones, XDP the
        /// SYNs of pods arriving on `interfaces`.
        pub enforcement: Vec<Enforcer> = vec![Enforcer::Cgroup, Enforcer::Xdp],
        /// Where the Prometheus metrics are served. Default `127.0.0.1:9464`: loopback, so
        /// nothing is exposed unless asked for (9464 is the OpenTelemetry Prometheus port).
        pub metrics_address: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9464)),
    }
}

layered_section! {
    /// Clients whose connections are never rejected.
    pub struct PriorityConfig / PriorityPatch {
        /// cgroup v2 paths (e.g. `/system.slice/kubelet.service`); connections from
        /// processes in them or below are admitted even to isolated upstreams. Default none.
        pub cgroups: Vec<String> = Vec::new(),
    }
}

/// The whole configuration, resolved: every field has its value (defaults filled in).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    /// `[tracking]`, `[defaults]`, `[guard]`, `[[groups]]`, `[[overrides]]` and
    /// `[never_isolate]`: what the breakers follow.
    pub engine: EngineConfig,
    pub priority: PriorityConfig,
}

/// The file as written: every section is a patch over the built-in defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    agent: AgentPatch,
    #[serde(default)]
    tracking: TrackingPatch,
    #[serde(default)]
    defaults: PolicyPatch,
    #[serde(default)]
    guard: GuardPatch,
    #[serde(default)]
    groups: Vec<GroupConfig>,
    #[serde(default)]
    overrides: Vec<OverrideConfig>,
    #[serde(default)]
    never_isolate: NeverIsolatePatch,
    #[serde(default)]
    services: ServicesPatch,
    #[serde(default)]
    priority: PriorityPatch,
}

impl ConfigFile {
    fn resolve(self) -> Config {
        let engine = EnginePatch {
            tracking: self.tracking,
            defaults: self.defaults,
            guard: self.guard,
            groups: self.groups,
            overrides: self.overrides,
            never_isolate: self.never_isolate,
            services: self.services,
        };
        Config {
            agent: patched(&self.agent),
            engine: engine.resolve(),
            priority: patched(&self.priority),
        }
    }
}

/// A configuration file's size limit: real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

impl Config {
    /// Reads and checks a configuration file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = Self::read_text(path)?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    /// A configuration file's text: a regular file (symlinks followed, as a ConfigMap's
    /// are) of at most [`MAX_CONFIG_BYTES`]. Opened without blocking, so a FIFO or a device
    /// at the path is an error, not a hang.
    pub fn read_text(path: &Path) -> Result<String, ConfigError> {
        use std::{io::Read, os::unix::fs::OpenOptionsExt};
        let read_error = |message: String, io: Option<std::io::Error>| ConfigError {
            kind: ConfigErrorKind::Read,
            source_name: path.display().to_string(),
            position: None,
            field: None,
            message,
            io,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|err| read_error(err.to_string(), Some(err)))?;
        let meta = file
            .metadata()
            .map_err(|err| read_error(err.to_string(), Some(err)))?;
        if !meta.is_file() {
            return Err(read_error("not a regular file".into(), None));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(read_error(
                format!(
                    "{} bytes: a configuration is at most {MAX_CONFIG_BYTES}",
                    meta.len()
                ),
                None,
            ));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|err| read_error(err.to_string(), Some(err)))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read_error(
                format!("more than {MAX_CONFIG_BYTES} bytes: a configuration is at most that"),
                None,
            ));
        }
        String::from_utf8(bytes).map_err(|_| read_error("not UTF-8 text".into(), None))
    }

    /// Parses and checks `text`; errors name it `name` (usually the file name).
    pub fn from_str_named(text: &str, name: &str) -> Result<Config, ConfigError> {
        let located =
            |kind, span: Option<Range<usize>>, field: Option<String>, message: &str| ConfigError {
                kind,
                source_name: name.to_owned(),
                position: span.map(|span| Position::of(text, span.start)),
                field,
                message: message.to_owned(),
                io: None,
            };
        // Parsed twice: once keeping every span, to turn error offsets into field paths and
        // field paths into positions; once through serde into the typed file.
        let document = DeTable::parse(text)
            .map_err(|err| located(ConfigErrorKind::Syntax, err.span(), None, err.message()))?;
        let file: ConfigFile = toml::from_str(text).map_err(|err| {
            let field = err
                .span()
                .and_then(|span| path_at(document.get_ref(), span.start))
                .map(|path| path.to_string());
            located(ConfigErrorKind::Schema, err.span(), field, err.message())
        })?;
        let config = file.resolve();
        config.check().map_err(|invalid| {
            let span = locate(document.get_ref(), invalid.path.segments());
            located(
                ConfigErrorKind::Invalid,
                span,
                Some(invalid.path.to_string()),
                &invalid.message,
            )
        })?;
        Ok(config)
    }

    /// The semantic checks of [`Config::from_str_named`], for a configuration built in code
    /// (the error has the field but no position).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|invalid| ConfigError {
            kind: ConfigErrorKind::Invalid,
            source_name: "configuration".to_owned(),
            position: None,
            field: Some(invalid.path.to_string()),
            message: invalid.message,
            io: None,
        })
    }

    fn check(&self) -> Result<(), InvalidSetting> {
        self.check_agent()?;
        self.engine.check()?;
        for (i, cgroup) in self.priority.cgroups.iter().enumerate() {
            if !cgroup.starts_with('/') {
                let path = FieldPath::key("priority").then("cgroups").index(i);
                return Err(InvalidSetting::new(
                    path,
                    format!(
                        "must be an absolute cgroup path such as \"/system.slice\", got {cgroup:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_agent(&self) -> Result<(), InvalidSetting> {
        let agent = &self.agent;
        let at = |field: &str| FieldPath::key("agent").then(field);
        if agent.lease < Duration::from_millis(300) {
            return Err(InvalidSetting::new(
                at("lease"),
                "must be at least 300ms (it is renewed every third of it)",
            ));
        }
        if agent.lease > MAX_LEASE {
            return Err(InvalidSetting::new(
                at("lease"),
                "must be at most 5m: a dead agent's verdicts hold until their lease ends",
            ));
        }
        if !agent.pin_dir.is_absolute() {
            return Err(InvalidSetting::new(
                at("pin_dir"),
                "must be an absolute path on bpffs",
            ));
        }
        if agent.enforcement.is_empty() {
            return Err(InvalidSetting::new(
                at("enforcement"),
                "needs at least one of \"cgroup\", \"xdp\", \"tc\"",
            ));
        }
        if let Some(i) = first_duplicate(&agent.enforcement) {
            return Err(InvalidSetting::new(
                at("enforcement").index(i),
                "is listed twice",
            ));
        }
        if let Some(i) = agent.interfaces.iter().position(String::is_empty) {
            return Err(InvalidSetting::new(at("interfaces").index(i), "is empty"));
        }
        if let Some(i) = first_duplicate(&agent.interfaces) {
            return Err(InvalidSetting::new(
                at("interfaces").index(i),
                "is listed twice",
            ));
        }
        Ok(())
    }
}

fn first_duplicate<T: Eq + std::hash::Hash>(items: &[T]) -> Option<usize> {
    let mut seen = HashSet::new();
    items.iter().position(|item| !seen.insert(item))
}

impl FromStr for Config {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_str_named(text, "configuration")
    }
}

/// The span of the value at `path`, or of the nearest enclosing value that is written down.
fn locate(table: &DeTable<'_>, path: &[PathSegment]) -> Option<Range<usize>> {
    let (PathSegment::Key(key), rest) = path.split_first()? else {
        return None;
    };
    let (_, value) = table.get_key_value(key.as_str())?;
    locate_in(value, rest).or_else(|| Some(value.span()))
}

fn locate_in(value: &toml::Spanned<DeValue<'_>>, path: &[PathSegment]) -> Option<Range<usize>> {
    let Some((segment, rest)) = path.split_first() else {
        return Some(value.span());
    };
    match (segment, value.get_ref()) {
        (PathSegment::Key(_), DeValue::Table(table)) => locate(table, path),
        (PathSegment::Index(i), DeValue::Array(items)) => {
            let item = items.get(*i)?;
            locate_in(item, rest).or_else(|| Some(item.span()))
        }
        _ => None,
    }
}

/// The path of the innermost key or value that contains byte `offset`.
fn path_at(table: &DeTable<'_>, offset: usize) -> Option<FieldPath> {
    let mut path = FieldPath::default();
    descend_table(table, offset, &mut path).then_some(path)
}

fn descend_table(table: &DeTable<'_>, offset: usize, path: &mut FieldPath) -> bool {
    for (key, value) in table.iter() {
        path.push(PathSegment::Key(key.get_ref().to_string()));
        if key.span().contains(&offset) || descend_value(value, offset, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn descend_value(value: &toml::Spanned<DeValue<'_>>, offset: usize, path: &mut FieldPath) -> bool {
    // Tables opened by a header have spans that do not cover their body: look inside first.
    let inside = match value.get_ref() {
        DeValue::Table(table) => descend_table(table, offset, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(PathSegment::Index(i));
            let found = descend_value(item, offset, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    };
    inside || value.span().contains(&offset)
}

/// 1-based line and column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    fn of(text: &str, offset: usize) -> Self {
        let before = &text[..offset.min(text.len())];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// What went wrong with a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Read,
    /// Not valid TOML.
    Syntax,
    /// Valid TOML, but an unknown field, a missing one, or a value of the wrong type or
    /// range.
    Schema,
    /// Each value is fine, the configuration is not (e.g. a CIDR in two groups).
    Invalid,
}

/// A configuration error with its file, position and field: for operators, one line.
#[derive(Debug)]
pub struct ConfigError {
    kind: ConfigErrorKind,
    source_name: String,
    position: Option<Position>,
    field: Option<String>,
    message: String,
    io: Option<std::io::Error>,
}

impl ConfigError {
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// The file name (or what [`Config::from_str_named`] was told).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    pub fn position(&self) -> Option<Position> {
        self.position
    }

    /// e.g. `groups[0].max_ejection_percent`.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source_name)?;
        if let Some(Position { line, column }) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io.as_ref().map(|err| err as _)
    }
}

/// The longest lease: how long a crashed agent's verdicts may outlive it.
pub const MAX_LEASE: Duration = Duration::from_secs(300);

/// The complete default configuration, every field explained. It parses to
/// `Config::default()`; copy it and change what you need.
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/config/circuit.toml");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Mode, Percent, WindowKind};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_named(text, "circuit.toml")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_example_is_the_default() {
        assert_eq!(parse(EXAMPLE_CONFIG).unwrap(), Config::default());
        assert_eq!(parse("").unwrap(), Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_example_mentions_every_policy_field() {
        // A field missing from the example would silently have no documented default there.
        for field in [
            "mode",
            "failure_threshold",
            "open_duration",
            "max_open_duration",
            "backoff",
            "backoff_multiplier",
            "backoff_decay",
            "open_jitter",
            "half_open_probes",
            "success_threshold",
            "probe_timeout",
            "abort_min_wait",
            "abort_latency_factor",
            "min_witnesses",
            "witness_window",
            "reject_percent",
            "syn_retransmit_is_failure",
            "reset_is_failure",
            "kind",
            "calls",
            "length",
            "buckets",
            "minimum_calls",
            "threshold_percent",
            "latency",
            "margin_percent",
            "floor_percent",
            "baseline_calls",
            "warmup_calls",
            "window",
            "trips",
            "multiplier",
            "failing_percent",
            "min_active",
            "max_upstreams",
            "idle_after",
            "activity_window",
            "interfaces",
            "xdp_mode",
            "pin_dir",
            "lease",
            "enforcement",
            "metrics_address",
            "cgroups",
            "upstreams",
        ] {
            assert!(
                EXAMPLE_CONFIG.contains(&format!("\n{field} = ")),
                "{field} is not set in EXAMPLE_CONFIG"
            );
        }
    }

    #[test]
    fn sections_override_the_defaults_field_by_field() {
        let config = parse(
            r#"
[agent]
interfaces = ["eth0", "veth1"]
enforcement = ["tc"]

[defaults]
failure_threshold = 3
[defaults.window]
kind = "time"

[[groups]]
name = "db"
upstreams = [{ cidr = "10.2.0.0/16", ports = [5432] }]
max_ejection_percent = 34
[groups.policy]
mode = "metrics_only"

[[overrides]]
upstreams = [{ cidr = "10.2.0.7" }]
policy = { half_open_probes = 3 }
"#,
        )
        .unwrap();
        assert_eq!(config.agent.interfaces, ["eth0", "veth1"]);
        assert_eq!(config.agent.enforcement, [Enforcer::Tc]);
        assert_eq!(config.agent.lease, Duration::from_secs(15));
        assert_eq!(config.engine.defaults.failure_threshold, 3);
        assert_eq!(config.engine.defaults.window.kind, WindowKind::Time);
        assert_eq!(config.engine.defaults.window.calls, 100);
        let group = &config.engine.groups[0];
        assert_eq!(group.max_ejection_percent, Percent::new(34));
        assert!(group.always_eject_one);
        assert_eq!(group.policy.mode, Some(Mode::MetricsOnly));
        assert_eq!(config.engine.overrides[0].policy.half_open_probes, Some(3));
    }

    #[test]
    fn syntax_errors_have_a_position() {
        assert_eq!(
            error("[agent]\nlease = = \"1s\"\n"),
            "circuit.toml:2:9: extra `=`, expected nothing"
        );
    }

    #[test]
    fn unknown_fields_name_the_field() {
        let err = parse("[defaults]\nfailure_treshold = 3\n").unwrap_err();
        assert_eq!(err.kind(), ConfigErrorKind::Schema);
        assert_eq!(err.field(), Some("defaults.failure_treshold"));
        assert_eq!(err.position(), Some(Position { line: 2, column: 1 }));
        assert!(
            err.to_string().starts_with(
                "circuit.toml:2:1: defaults.failure_treshold: unknown field `failure_treshold`"
            ),
            "{err}"
        );
        let err =
            parse("[[groups]]\nname = \"a\"\nupstreams = []\n[groups.policy.window]\nbucket = 3\n")
                .unwrap_err();
        assert_eq!(err.field(), Some("groups[0].policy.window.bucket"));
        assert_eq!(err.position(), Some(Position { line: 5, column: 1 }));
        assert!(
            error("colour = 1").starts_with("circuit.toml:1:1: colour: unknown field `colour`")
        );
    }

    #[test]
    fn bad_values_name_the_field_and_the_reason() {
        let text = "[[groups]]\nname = \"web\"\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\nmax_ejection_percent = 140\n";
        assert_eq!(
            error(text),
            "circuit.toml:4:24: groups[0].max_ejection_percent: must be between 0 and 100, got 140"
        );
        assert_eq!(
            error("[defaults]\nopen_duration = \"soon\"\n"),
            "circuit.toml:2:17: defaults.open_duration: invalid duration \"soon\" (expected number at 0); write e.g. \"30s\", \"1m 30s\" or \"250ms\""
        );
        assert_eq!(
            error("[defaults]\nhalf_open_probes = \"two\"\n"),
            "circuit.toml:2:20: defaults.half_open_probes: invalid type: string \"two\", expected u32"
        );
        let err = error("[never_isolate]\nupstreams = [{ cidr = \"10.0.0.1/8\" }]\n");
        assert!(
            err.starts_with("circuit.toml:2:23: never_isolate.upstreams[0].cidr: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"),
            "{err}"
        );
        let err = error("[agent]\nxdp_mode = \"fast\"\n");
        assert!(
            err.starts_with("circuit.toml:2:12: agent.xdp_mode: unknown variant `fast`"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_point_at_the_offending_value() {
        assert_eq!(
            error("[defaults]\nhalf_open_probes = 0\n"),
            "circuit.toml:2:20: defaults.half_open_probes: must be at least 1"
        );
        assert_eq!(
            error(
                "[[overrides]]\nupstreams = [{ cidr = \"10.0.0.1\" }]\n[overrides.policy.window]\nbuckets = 5000\n"
            ),
            "circuit.toml:4:11: overrides[0].policy.window.buckets: must be between 1 and 3600, got 5000"
        );
        assert_eq!(
            error("[agent]\nlease = \"100ms\"\n"),
            "circuit.toml:2:9: agent.lease: must be at least 300ms (it is renewed every third of it)"
        );
        assert_eq!(
            error("[agent]\nlease = \"365days\"\n"),
            "circuit.toml:2:9: agent.lease: must be at most 5m: a dead agent's verdicts hold until their lease ends"
        );
        assert_eq!(
            error("[tracking]\nmax_upstreams = 4294967295\n"),
            "circuit.toml:2:17: tracking.max_upstreams: must be at most 65536: the kernel holds that many verdicts"
        );
        // Within the kernel's bound, but 65 536 windows of 100 000 calls do not fit.
        let huge_windows = error(
            "[[overrides]]\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\npolicy = { failure_rate = { enabled = true }, window = { calls = 100000 } }\n",
        );
        assert!(
            huge_windows.starts_with("circuit.toml:")
                && huge_windows.contains("tracking.max_upstreams: 65536 upstreams of up to"),
            "{huge_windows}"
        );
        parse("[[overrides]]\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\npolicy = { failure_rate = { enabled = true }, window = { calls = 100000 } }\n[tracking]\nmax_upstreams = 1000\n").unwrap();
        // A group sizes the window, an override turns it on: an upstream in both holds it.
        let combined = error(
            "[[groups]]\nname = \"g\"\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\npolicy = { window = { calls = 100000 } }\n[[overrides]]\nupstreams = [{ cidr = \"10.1.0.0/16\" }]\npolicy = { failure_rate = { enabled = true } }\n",
        );
        assert!(
            combined.contains("tracking.max_upstreams: 65536 upstreams"),
            "{combined}"
        );
        let two_groups = r#"
[[groups]]
name = "a"
upstreams = [{ cidr = "10.0.0.0/8", ports = [80, 443] }]
[[groups]]
name = "b"
upstreams = [{ cidr = "10.1.0.0/16" }, { cidr = "10.0.0.0/8", ports = [443] }]
"#;
        assert_eq!(
            error(two_groups),
            "circuit.toml:7:40: groups[1].upstreams[1]: 10.0.0.0/8 port 443 is already in group \"a\"; an upstream belongs to one group"
        );
        assert_eq!(
            error(
                "[[groups]]\nname = \"a\"\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\n[[groups]]\nname = \"a\"\nupstreams = [{ cidr = \"10.1.0.0/16\" }]\n"
            ),
            "circuit.toml:5:8: groups[1].name: another group is already named \"a\""
        );
        assert_eq!(
            error(
                "[[groups]]\nname = \"a\"\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\n[groups.guard]\nmin_active = 0\n"
            ),
            "circuit.toml:5:14: groups[0].guard.min_active: must be at least 1"
        );
        assert_eq!(
            error("[priority]\ncgroups = [\"kubepods\"]\n"),
            "circuit.toml:2:12: priority.cgroups[0]: must be an absolute cgroup path such as \"/system.slice\", got \"kubepods\""
        );
        assert_eq!(
            error("[agent]\nenforcement = [\"xdp\", \"xdp\"]\n"),
            "circuit.toml:2:23: agent.enforcement[1]: is listed twice"
        );
    }

    #[test]
    fn missing_fields_point_at_their_table() {
        assert_eq!(
            error("[[groups]]\nupstreams = [{ cidr = \"10.0.0.0/8\" }]\n"),
            "circuit.toml:1:1: groups[0]: missing field `name`"
        );
    }

    #[test]
    fn programmatic_configs_are_checked_too() {
        let mut config = Config::default();
        config.engine.tracking.max_upstreams = 0;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "configuration: tracking.max_upstreams: must be at least 1"
        );
    }

    #[test]
    fn files_are_read_and_errors_name_them() {
        let dir = std::env::temp_dir().join(format!("circuit-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("circuit.toml");
        std::fs::write(&path, EXAMPLE_CONFIG).unwrap();
        assert_eq!(Config::from_file(&path).unwrap(), Config::default());
        std::fs::write(&path, "[tracking]\nmax_upstreams = -1\n").unwrap();
        let err = Config::from_file(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2:17: tracking.max_upstreams:", path.display())),
            "{err}"
        );
        let missing = Config::from_file(dir.join("absent.toml")).unwrap_err();
        assert_eq!(missing.kind(), ConfigErrorKind::Read);
        // A FIFO with no writer would block a plain open forever; a directory, a huge file
        // and a device are refused too, each with a read error.
        let fifo = dir.join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let huge = dir.join("huge.toml");
        std::fs::write(&huge, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
        for (bad, why) in [
            (fifo.as_path(), "not a regular file"),
            (dir.as_path(), "not a regular file"),
            (Path::new("/dev/zero"), "not a regular file"),
            (huge.as_path(), "a configuration is at most"),
        ] {
            let err = Config::from_file(bad).unwrap_err();
            assert_eq!(err.kind(), ConfigErrorKind::Read, "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
