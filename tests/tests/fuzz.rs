//! Property-based fuzzing of the configuration parser (`Config::from_str_named`): random
//! TOML-ish text, random token soups over circuit's own section and field names, and random
//! mutations of valid configurations never panic, and every error carries a line:column
//! that points into the text.
//!
//! 256 cases per property by default (CI); more with e.g.
//! `PROPTEST_CASES=100000 cargo test -p circuit-tests --test fuzz --release`.
//! The packet parser is the kernel program itself, fuzzed with 100,000 randomized frames by
//! `randomized_frames_never_abort_and_only_open_upstreams_are_rejected` in xdp_fixtures.rs.

use circuit_agent::config::{Config, EXAMPLE_CONFIG};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

const NAME: &str = "fuzz.toml";

/// Cases per property: $PROPTEST_CASES, else 256.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // No regression files in the source tree; a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Parses `text`; on error, checks that the position exists, lies within the text and is
/// what the message starts with.
fn parse_checked(text: &str) -> Result<(), TestCaseError> {
    let Err(err) = Config::from_str_named(text, NAME) else {
        return Ok(());
    };
    let Some(pos) = err.position() else {
        return Err(TestCaseError::fail(format!(
            "error without a position: {err}"
        )));
    };
    let lines: Vec<&str> = text.split('\n').collect();
    prop_assert!(
        (1..=lines.len()).contains(&pos.line),
        "line {} of {}: {err}",
        pos.line,
        lines.len()
    );
    let width = lines[pos.line - 1].chars().count();
    prop_assert!(
        (1..=width + 1).contains(&pos.column),
        "column {} of a {width}-character line: {err}",
        pos.column
    );
    let prefix = format!("{NAME}:{}:{}: ", pos.line, pos.column);
    prop_assert!(err.to_string().starts_with(&prefix), "{err}");
    Ok(())
}

/// Section headers, keys and values circuit's configuration uses, plus near misses.
const TOKENS: &[&str] = &[
    "[agent]",
    "[tracking]",
    "[defaults]",
    "[defaults.window]",
    "[defaults.failure_rate]",
    "[defaults.slow_connects]",
    "[defaults.adaptive]",
    "[defaults.flapping]",
    "[guard]",
    "[never_isolate]",
    "[priority]",
    "[[groups]]",
    "[groups.policy]",
    "[groups.guard]",
    "[[overrides]]",
    "[overrides.policy]",
    "[agent",
    "]]",
    "interfaces",
    "xdp_mode",
    "pin_dir",
    "lease",
    "enforcement",
    "metrics_address",
    "max_upstreams",
    "idle_after",
    "activity_window",
    "mode",
    "failure_threshold",
    "open_duration",
    "max_open_duration",
    "backoff",
    "backoff_multiplier",
    "half_open_probes",
    "success_threshold",
    "reject_percent",
    "kind",
    "calls",
    "minimum_calls",
    "threshold_percent",
    "enabled",
    "failing_percent",
    "min_active",
    "name",
    "upstreams",
    "cidr",
    "ports",
    "max_ejection_percent",
    "policy",
    "cgroups",
    "=",
    "=",
    ".",
    ",",
    "{",
    "}",
    "[",
    "]",
    "\n",
    "\n",
    "\n",
    "#",
    "0",
    "1",
    "-1",
    "100",
    "101",
    "4294967296",
    "1e400",
    "nan",
    "inf",
    "0.5",
    "true",
    "false",
    "\"\"",
    "\"30s\"",
    "\"0s\"",
    "\"soon\"",
    "\"1h 30m\"",
    "\"enforce\"",
    "\"metrics_only\"",
    "\"count\"",
    "\"time\"",
    "\"exponential\"",
    "\"cgroup\"",
    "\"xdp\"",
    "\"native\"",
    "\"eth0\"",
    "\"10.0.0.0/8\"",
    "\"10.0.0.1/8\"",
    "\"::/0\"",
    "\"fd00::1\"",
    "\"127.0.0.1:9464\"",
    "\"/system.slice\"",
    "\"relative\"",
    "\"é\"",
    "'literal'",
    "\"\"\"multi\nline\"\"\"",
    "1979-05-27T07:32:00Z",
    "é",
    "\u{feff}",
    "\t",
    "\r\n",
];

/// Text from TOML's own punctuation, letters, digits and a few multi-byte characters.
fn toml_ish() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r#"[\[\]{}=",.#'a-z_0-9 \t\n:/\-+éü€𝄞]{0,300}"#)
        .expect("valid regex")
}

/// Tokens of circuit's configuration joined by spaces: mostly well-formed lexically, so
/// the schema and semantic checks get exercised, not only the TOML syntax.
fn token_soup() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(TOKENS), 0..80).prop_map(|t| t.join(" "))
}

/// A valid configuration with groups, overrides and lists, besides the (comment-heavy)
/// example.
const RICH: &str = r#"[agent]
interfaces = ["eth0", "veth1"]
enforcement = ["cgroup", "xdp"]
lease = "10s"

[tracking]
max_upstreams = 1000

[defaults]
failure_threshold = 3
open_duration = "5s"
[defaults.window]
kind = "time"
length = "30s"
buckets = 30
[defaults.failure_rate]
enabled = true
threshold_percent = 40

[guard]
enabled = false

[[groups]]
name = "db"
upstreams = [{ cidr = "10.2.0.0/16", ports = [5432] }]
max_ejection_percent = 34
[groups.policy]
mode = "metrics_only"

[[groups]]
name = "web"
upstreams = [{ cidr = "fd00::/64" }, { cidr = "192.0.2.0/24", ports = [80, 443] }]

[[overrides]]
upstreams = [{ cidr = "10.2.0.7" }]
policy = { half_open_probes = 3, success_threshold = 2 }

[never_isolate]
upstreams = [{ cidr = "0.0.0.0/0", ports = [53] }]

[priority]
cgroups = ["/system.slice/kubelet.service"]
"#;

#[derive(Clone, Debug)]
enum Mutation {
    /// Remove a range of characters.
    Delete { at: usize, len: usize },
    /// Insert a token.
    Insert { at: usize, token: &'static str },
    /// Replace the value of the n-th `key = value` line.
    Revalue { line: usize, token: &'static str },
    /// Duplicate a line (duplicate keys, duplicate tables).
    Duplicate { line: usize },
    /// Swap two lines (keys move into other tables).
    Swap { a: usize, b: usize },
    /// Cut the text short.
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let token = || proptest::sample::select(TOKENS);
    prop_oneof![
        (any::<usize>(), 1..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), token()).prop_map(|(at, token)| Mutation::Insert { at, token }),
        (any::<usize>(), token()).prop_map(|(line, token)| Mutation::Revalue { line, token }),
        any::<usize>().prop_map(|line| Mutation::Duplicate { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// A character boundary of `text` chosen by `seed`.
fn boundary(text: &str, seed: usize) -> usize {
    text.floor_char_boundary(seed % (text.len() + 1))
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let n = lines.len();
    match *m {
        Mutation::Delete { at, len } => {
            let start = boundary(text, at);
            let end = text.floor_char_boundary((start + len).min(text.len()));
            return format!("{}{}", &text[..start], &text[end..]);
        }
        Mutation::Insert { at, token } => {
            let at = boundary(text, at);
            return format!("{}{token}{}", &text[..at], &text[at..]);
        }
        Mutation::Truncate { at } => return text[..boundary(text, at)].to_owned(),
        Mutation::Revalue { line, token } => {
            let valued: Vec<usize> = (0..n)
                .filter(|&i| !lines[i].trim_start().starts_with('#') && lines[i].contains(" = "))
                .collect();
            if let Some(&i) = valued.get(line % valued.len().max(1)) {
                let key = lines[i].split(" = ").next().unwrap_or_default().to_owned();
                lines[i] = format!("{key} = {token}");
            }
        }
        Mutation::Duplicate { line } => {
            let copy = lines[line % n].clone();
            lines.insert(line % n, copy);
        }
        Mutation::Swap { a, b } => lines.swap(a % n, b % n),
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_text_never_panics_and_errors_have_a_position(text in toml_ish()) {
        parse_checked(&text)?;
    }

    #[test]
    fn token_soups_never_panic_and_errors_have_a_position(text in token_soup()) {
        parse_checked(&text)?;
    }

    #[test]
    fn mutated_valid_configs_never_panic_and_errors_have_a_position(
        rich in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let mut text = if rich { RICH } else { EXAMPLE_CONFIG }.to_owned();
        for m in &mutations {
            text = apply(&text, m);
        }
        parse_checked(&text)?;
    }
}

#[test]
fn the_seed_configurations_are_valid() {
    Config::from_str_named(RICH, NAME).unwrap();
    Config::from_str_named(EXAMPLE_CONFIG, NAME).unwrap();
}

/// Guards against fuzzing that only ever hits the TOML syntax check: with a fixed seed, the
/// generators above reach valid configurations and each kind of error.
#[test]
fn the_generators_reach_valid_configs_and_every_kind_of_error() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let mutated = (any::<bool>(), proptest::collection::vec(mutation(), 1..5));
    let mut kinds = std::collections::BTreeSet::new();
    let mut valid = 0;
    // Until every kind is seen (a few hundred cases with this seed), within a bound that
    // makes a generator that cannot reach one fail.
    for _ in 0..20_000 {
        if valid > 0 && kinds.len() == 3 {
            break;
        }
        let (rich, mutations) = mutated.new_tree(&mut runner).unwrap().current();
        let mut text = if rich { RICH } else { EXAMPLE_CONFIG }.to_owned();
        for m in &mutations {
            text = apply(&text, m);
        }
        let soup = token_soup().new_tree(&mut runner).unwrap().current();
        for text in [text, soup] {
            match Config::from_str_named(&text, NAME) {
                Ok(_) => valid += 1,
                Err(err) => {
                    kinds.insert(format!("{:?}", err.kind()));
                }
            }
        }
    }
    assert!(valid > 0, "no valid configuration generated");
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["Invalid", "Schema", "Syntax"],
        "error kinds reached"
    );
}
