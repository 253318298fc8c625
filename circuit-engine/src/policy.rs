//! The rules one breaker follows, with their defaults and the reasons for them.
//!
//! Every section is declared once with [`layered_section!`], which also generates its *patch*:
//! the same fields as `Option`s, which is what one configuration layer (the `[defaults]`
//! table, a group, an override) says. A policy is resolved by applying patches to the
//! built-in defaults, so a layer that sets only `failure_rate.threshold_percent` keeps every
//! other value from the layers below it.
//!
//! Every check in [`BreakerPolicy::validate`] looks at one field alone, so any combination of
//! individually valid layers is valid: the configuration is checked once, at load time, and
//! resolving a policy for an upstream at run time cannot fail.

use std::time::Duration;

use serde::Deserialize;

use super::units::{Factor, HumanDuration, Percent};

/// A value that configuration layers can set: leaves are replaced whole, sections merge field
/// by field.
pub trait Layered {
    /// What one layer may say about this value.
    type Patch: Clone + std::fmt::Debug + PartialEq + serde::de::DeserializeOwned;
    fn apply(&mut self, patch: &Self::Patch);
    /// The value as a configuration file writes it (durations as `"30s"`), for JSON output.
    fn serialize_as_written<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
}

/// Serializes a [`Layered`] value as a configuration file writes it: sections become
/// objects of their fields, so a resolved policy reads like the TOML that set it.
pub struct AsWritten<'a, T>(pub &'a T);

impl<T: Layered> serde::Serialize for AsWritten<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_as_written(serializer)
    }
}

#[macro_export]
macro_rules! layered_leaves {
    ($($ty:ty => $patch:ty),* $(,)?) => {$(
        impl $crate::policy::Layered for $ty {
            type Patch = $patch;
            fn apply(&mut self, patch: &$patch) {
                *self = patch.clone().into();
            }
            fn serialize_as_written<S: serde::Serializer>(
                &self,
                serializer: S,
            ) -> Result<S::Ok, S::Error> {
                serde::Serialize::serialize(&<$patch>::from(self.clone()), serializer)
            }
        }
    )*};
}
pub use crate::layered_leaves;

/// A list is a leaf: a layer that sets it replaces it whole.
impl<T> Layered for Vec<T>
where
    T: Clone + std::fmt::Debug + PartialEq + serde::de::DeserializeOwned + serde::Serialize,
{
    type Patch = Vec<T>;
    fn apply(&mut self, patch: &Vec<T>) {
        self.clone_from(patch);
    }
    fn serialize_as_written<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(self, serializer)
    }
}

layered_leaves!(
    std::path::PathBuf => std::path::PathBuf,
    std::net::SocketAddr => std::net::SocketAddr,
    u32 => u32,
    bool => bool,
    Duration => HumanDuration,
    Percent => Percent,
    Factor => Factor,
    Mode => Mode,
    BackoffKind => BackoffKind,
    WindowKind => WindowKind,
);

/// Declares a configuration section: the struct with its defaults, and its patch.
#[macro_export]
macro_rules! layered_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident / $patch:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty = $default:expr,
            )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )+
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )+ }
            }
        }

        #[doc = concat!(
            "One configuration layer's say on [`", stringify!($name),
            "`]: the fields it sets; the rest come from the layers below."
        )]
        #[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $patch {
            $( pub $field: Option<<$ty as $crate::policy::Layered>::Patch>, )+
        }

        impl $crate::policy::Layered for $name {
            type Patch = $patch;
            fn apply(&mut self, patch: &$patch) {
                $(
                    if let Some(value) = &patch.$field {
                        $crate::policy::Layered::apply(&mut self.$field, value);
                    }
                )+
            }
            fn serialize_as_written<S: serde::Serializer>(
                &self,
                serializer: S,
            ) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let fields = [$(stringify!($field)),+].len();
                let mut out = serializer.serialize_struct(stringify!($name), fields)?;
                $(
                    out.serialize_field(
                        stringify!($field),
                        &$crate::policy::AsWritten(&self.$field),
                    )?;
                )+
                out.end()
            }
        }
    };
}
pub use crate::layered_section;

/// What a breaker does with its decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Decisions are enforced.
    #[default]
    Enforce,
    /// Dry run: the breaker runs normally and publishes its would-be transitions; the kernel
    /// counts the connections it would reject and rejects none.
    MetricsOnly,
    /// Never trips; outcomes are only counted.
    Disabled,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::MetricsOnly => "metrics_only",
            Mode::Disabled => "disabled",
        }
    }
}

/// How the open duration grows with repeated ejections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    /// `open_duration × n` for the n-th ejection (Envoy).
    #[default]
    Linear,
    /// `open_duration × backoff_multiplier^(n-1)` (resilience4j's exponential interval).
    Exponential,
}

/// How a sliding window counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last `calls` outcomes (resilience4j COUNT_BASED).
    #[default]
    Count,
    /// The outcomes of the last `length`, aggregated in `buckets` steps (resilience4j
    /// TIME_BASED).
    Time,
}

/// Largest count window: bounds memory per upstream (two bits per call).
pub const MAX_WINDOW_CALLS: u32 = 100_000;
/// Most buckets in a time window: bounds memory per upstream (24 bytes per bucket).
pub const MAX_WINDOW_BUCKETS: u32 = 3_600;
/// Most trips the flapping detector remembers (a fixed array per upstream).
pub const MAX_FLAP_TRIPS: u32 = 8;

layered_section! {
    /// The rules one breaker follows. Validated by [`BreakerPolicy::validate`].
    ///
    /// Defaults are conservative: only the consecutive-failure detector is on, as in Envoy,
    /// and the open duration grows the way Envoy's ejection time does.
    pub struct BreakerPolicy / PolicyPatch {
        /// `enforce`, `metrics_only` (dry run: would-be transitions are published and the
        /// kernel only counts would-be rejects) or `disabled` (never trips).
        /// Default `enforce`.
        pub mode: Mode = Mode::Enforce,
        /// Consecutive failed connects that open the breaker; 0 turns this detector off.
        /// Default 5: Envoy's `consecutive_5xx` (connect failures for TCP). A few failures
        /// are noise, five in a row are not.
        pub failure_threshold: u32 = 5,
        /// Open duration of the first ejection. Default 30 s: Envoy's `base_ejection_time`.
        pub open_duration: Duration = Duration::from_secs(30),
        /// Cap on the grown open duration (before jitter; never below `open_duration`).
        /// Default 300 s: Envoy's `max_ejection_time`.
        pub max_open_duration: Duration = Duration::from_secs(300),
        /// `linear` (Envoy) or `exponential`. Default `linear`: it grows predictably, and the
        /// cap is reached after 10 ejections rather than 5.
        pub backoff: BackoffKind = BackoffKind::Linear,
        /// Growth factor per ejection for `exponential` backoff, at least 1. Default 2.
        pub backoff_multiplier: Factor = Factor::whole(2),
        /// Time spent CLOSED that forgets one ejection. Default 10 s: Envoy decrements its
        /// ejection multiplier once per healthy 10 s `interval`.
        pub backoff_decay: Duration = Duration::from_secs(10),
        /// Upper bound of the random time added to each open period. Default 0 (Envoy's
        /// `max_ejection_time_jitter`): a node admits only `half_open_probes` probes, so
        /// synchronised recovery across nodes costs the upstream little.
        pub open_jitter: Duration = Duration::ZERO,
        /// New connections the kernel admits as probes in HALF_OPEN. Default 1 (Hystrix,
        /// Polly, gobreaker): keeps load off a recovering upstream.
        pub half_open_probes: u32 = 1,
        /// Successful probes that close the breaker; values above `half_open_probes` count as
        /// `half_open_probes`. Any failed probe re-opens it. Default 1.
        pub success_threshold: u32 = 1,
        /// How long an admitted probe may go without an outcome before its token is given
        /// back, so that the next connection can probe. The breaker stays HALF_OPEN: only an
        /// observed failure re-opens it, and with no traffic it waits for traffic
        /// (resilience4j's `maxWaitDurationInHalfOpenState = 0`). Default 10 s: an outcome
        /// lost on its way (a full ring buffer, an agent restart) costs one probe slot for
        /// that long, while a probe that is merely slow (SYN retransmissions take 1 s, 3 s,
        /// 7 s...) rarely has company.
        pub probe_timeout: Duration = Duration::from_secs(10),
        /// An aborted connect (the application closed it before any answer) is evidence
        /// against the upstream only when it waited at least this long, and at least
        /// `abort_latency_factor` times the upstream's usual connect latency. Default 100 ms:
        /// well above a LAN round trip, below the Happy Eyeballs delay (250-300 ms), so
        /// hedged and cancelled connects are never evidence while a client that gives up
        /// after 200 ms on a black hole still is.
        pub abort_min_wait: Duration = Duration::from_millis(100),
        /// See `abort_min_wait`. Default 4: a connect that waited four usual round trips
        /// without an answer has seen its SYN go unanswered.
        pub abort_latency_factor: u32 = 4,
        /// Distinct clients (cgroups: pods) whose failures a trip needs to isolate the
        /// upstream for the whole node. With fewer, or while a client keeps connecting
        /// successfully, only the failing clients are failed fast, each on its own. Default
        /// 2: one pod's own trouble (a NetworkPolicy, a broken sidecar, a hostile process)
        /// is never the node's. 1 restores isolation on any single client's word.
        pub min_witnesses: u32 = 2,
        /// How recent a client's failure or success must be to witness. Default 60 s.
        pub witness_window: Duration = Duration::from_secs(60),
        /// Share of new connections rejected while OPEN (and of those beyond the probe
        /// budget in HALF_OPEN); below 100 this is partial breaking, decided per connection
        /// in the kernel. Default 100.
        pub reject_percent: Percent = Percent::HUNDRED,
        /// Count each SYN retransmission as a failed connect. Default false: one lost SYN is
        /// common on a healthy network, and the connect's final outcome is counted anyway.
        pub syn_retransmit_is_failure: bool = false,
        /// Count a reset after establishment as a failed connect. Default false: servers and
        /// load balancers routinely reset idle or finished connections.
        pub reset_is_failure: bool = false,
        /// The sliding window behind the rate detectors.
        pub window: WindowPolicy = WindowPolicy::default(),
        /// Trip on the failure rate over the window.
        pub failure_rate: FailureRatePolicy = FailureRatePolicy::default(),
        /// Trip on the rate of slow connects over the window.
        pub slow_connects: SlowConnectPolicy = SlowConnectPolicy::default(),
        /// Trip when the failure rate rises above the upstream's own learned baseline.
        pub adaptive: AdaptivePolicy = AdaptivePolicy::default(),
        /// Longer open durations for upstreams that open and close repeatedly.
        pub flapping: FlappingPolicy = FlappingPolicy::default(),
    }
}

layered_section! {
    /// The sliding window shared by the failure-rate, slow-connect and adaptive detectors.
    /// It is only allocated for upstreams whose policy enables one of them.
    pub struct WindowPolicy / WindowPatch {
        /// `count` or `time`. Default `count` (resilience4j's default).
        pub kind: WindowKind = WindowKind::Count,
        /// Outcomes a count window holds. Default 100 (resilience4j `slidingWindowSize`).
        pub calls: u32 = 100,
        /// Length of a time window. Default 60 s.
        pub length: Duration = Duration::from_secs(60),
        /// Steps a time window slides in (its resolution). Default 60: one-second buckets,
        /// as resilience4j aggregates.
        pub buckets: u32 = 60,
        /// Outcomes the window must hold before a rate detector may trip (for a count window
        /// at most `calls`). Default 20 (Hystrix `requestVolumeThreshold`): a rate over fewer
        /// connects is noise.
        pub minimum_calls: u32 = 20,
    }
}

layered_section! {
    /// Trip when the share of failed connects in the window reaches a threshold.
    pub struct FailureRatePolicy / FailureRatePatch {
        /// Default false: Envoy enforces its failure-percentage detector at 0 % by default.
        pub enabled: bool = false,
        /// Failure rate that opens the breaker. Default 50 (resilience4j
        /// `failureRateThreshold`).
        pub threshold_percent: Percent = Percent::new(50),
    }
}

layered_section! {
    /// Trip when the share of slow connects in the window reaches a threshold.
    pub struct SlowConnectPolicy / SlowConnectPatch {
        /// Default false: latency depends on the upstream, so a threshold must be chosen.
        pub enabled: bool = false,
        /// A connect that took at least this long is slow. Default 1 s: the initial SYN
        /// retransmission timeout, so a slow connect needed a retransmission or waited on a
        /// full accept queue.
        pub latency: Duration = Duration::from_secs(1),
        /// Slow-connect rate that opens the breaker. Default 50: half the connects degraded.
        pub threshold_percent: Percent = Percent::new(50),
    }
}

layered_section! {
    /// Trip when the window's failure rate exceeds the upstream's own baseline, an
    /// exponentially weighted moving average learned while it is CLOSED, by `margin_percent`
    /// percentage points — and is at least `floor_percent`.
    pub struct AdaptivePolicy / AdaptivePatch {
        /// Default false: a learned baseline needs traffic and tuning to be trustworthy.
        pub enabled: bool = false,
        /// Percentage points above the baseline that trip. Default 20.
        pub margin_percent: Percent = Percent::new(20),
        /// Failure rate below which this detector never trips, whatever the baseline.
        /// Default 10: an upstream that always succeeded must not trip on a 1-in-5 blip.
        pub floor_percent: Percent = Percent::new(10),
        /// Memory of the baseline in connects (the EWMA weight is 2 / (n + 1)). Default 1000:
        /// ten default windows, so a failure burst moves it little.
        pub baseline_calls: u32 = 1_000,
        /// Connects learned before the baseline is trusted. Default 200.
        pub warmup_calls: u32 = 200,
    }
}

layered_section! {
    /// An upstream that trips `trips` times within `window` is flapping: its open durations
    /// are multiplied by `multiplier` (still capped by `max_open_duration`).
    pub struct FlappingPolicy / FlappingPatch {
        /// Default true: it only lengthens isolation of an upstream that keeps failing again
        /// shortly after recovering.
        pub enabled: bool = true,
        /// Default 10 min.
        pub window: Duration = Duration::from_secs(600),
        /// Trips (CLOSED → OPEN, the current one included) that mean flapping, 2 to 8.
        /// Default 3.
        pub trips: u32 = 3,
        /// At least 1. Default 2.
        pub multiplier: Factor = Factor::whole(2),
    }
}

/// A policy value that cannot work, named by its field path in the policy table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// e.g. `"half_open_probes"` or `"window.buckets"`.
    pub field: &'static str,
    pub message: String,
}

fn check(
    ok: bool,
    field: &'static str,
    message: impl FnOnce() -> String,
) -> Result<(), PolicyError> {
    if ok {
        Ok(())
    } else {
        Err(PolicyError {
            field,
            message: message(),
        })
    }
}

fn positive(d: Duration, field: &'static str) -> Result<(), PolicyError> {
    check(!d.is_zero(), field, || "must be longer than 0s".to_owned())
}

fn at_least_one(n: u32, field: &'static str) -> Result<(), PolicyError> {
    check(n >= 1, field, || "must be at least 1".to_owned())
}

fn at_least_one_x(f: Factor, field: &'static str) -> Result<(), PolicyError> {
    check(f >= Factor::ONE, field, || {
        format!("must be at least 1, got {}", f.as_f64())
    })
}

fn above_zero(p: Percent, field: &'static str) -> Result<(), PolicyError> {
    check(p > Percent::ZERO, field, || "must be above 0".to_owned())
}

impl BreakerPolicy {
    /// Checks every field on its own (see the module documentation for why).
    pub fn validate(&self) -> Result<(), PolicyError> {
        positive(self.open_duration, "open_duration")?;
        positive(self.backoff_decay, "backoff_decay")?;
        at_least_one_x(self.backoff_multiplier, "backoff_multiplier")?;
        at_least_one(self.half_open_probes, "half_open_probes")?;
        at_least_one(self.success_threshold, "success_threshold")?;
        positive(self.probe_timeout, "probe_timeout")?;
        at_least_one(self.abort_latency_factor, "abort_latency_factor")?;
        at_least_one(self.min_witnesses, "min_witnesses")?;
        positive(self.witness_window, "witness_window")?;
        check(
            self.reject_percent > Percent::ZERO,
            "reject_percent",
            || "must be above 0 (to reject nothing, use mode = \"metrics_only\")".to_owned(),
        )?;

        let w = &self.window;
        check(
            (1..=MAX_WINDOW_CALLS).contains(&w.calls),
            "window.calls",
            || format!("must be between 1 and {MAX_WINDOW_CALLS}, got {}", w.calls),
        )?;
        check(
            w.length >= Duration::from_millis(1),
            "window.length",
            || "must be at least 1ms".to_owned(),
        )?;
        check(
            (1..=MAX_WINDOW_BUCKETS).contains(&w.buckets),
            "window.buckets",
            || {
                format!(
                    "must be between 1 and {MAX_WINDOW_BUCKETS}, got {}",
                    w.buckets
                )
            },
        )?;
        at_least_one(w.minimum_calls, "window.minimum_calls")?;

        above_zero(
            self.failure_rate.threshold_percent,
            "failure_rate.threshold_percent",
        )?;
        positive(self.slow_connects.latency, "slow_connects.latency")?;
        above_zero(
            self.slow_connects.threshold_percent,
            "slow_connects.threshold_percent",
        )?;
        at_least_one(self.adaptive.baseline_calls, "adaptive.baseline_calls")?;

        let f = &self.flapping;
        positive(f.window, "flapping.window")?;
        check(
            (2..=MAX_FLAP_TRIPS).contains(&f.trips),
            "flapping.trips",
            || format!("must be between 2 and {MAX_FLAP_TRIPS}, got {}", f.trips),
        )?;
        at_least_one_x(f.multiplier, "flapping.multiplier")?;
        Ok(())
    }

    /// Whether any detector needs the sliding window.
    pub fn needs_window(&self) -> bool {
        self.failure_rate.enabled || self.slow_connects.enabled || self.adaptive.enabled
    }

    /// Successful probes that close the breaker, as applied (capped by the probe budget).
    pub fn probes_to_close(&self) -> u32 {
        self.success_threshold.min(self.half_open_probes)
    }

    /// Outcomes the window must hold before a rate detector may trip, as applied.
    pub fn window_minimum_calls(&self) -> u32 {
        match self.window.kind {
            WindowKind::Count => self.window.minimum_calls.min(self.window.calls),
            WindowKind::Time => self.window.minimum_calls,
        }
    }

    /// The cap on grown open durations, as applied (Envoy: never below the base).
    pub fn open_duration_cap(&self) -> Duration {
        self.max_open_duration.max(self.open_duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(BreakerPolicy::default().validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = BreakerPolicy {
            half_open_probes: 0,
            ..BreakerPolicy::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "half_open_probes");
        let mut bad = BreakerPolicy::default();
        bad.window.buckets = 0;
        let err = bad.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "window.buckets: must be between 1 and 3600, got 0"
        );
        let mut bad = BreakerPolicy::default();
        bad.flapping.trips = 9;
        assert_eq!(bad.validate().unwrap_err().field, "flapping.trips");
    }

    /// A resolved policy written out reads back as the same policy: what `inspect` shows is
    /// valid configuration.
    #[test]
    fn a_policy_as_written_is_configuration_that_resolves_to_it() {
        let mut policy = BreakerPolicy::default();
        let patch: PolicyPatch = toml::from_str(
            "failure_threshold = 3\nopen_duration = \"1m 30s\"\nmode = \"metrics_only\"\n[failure_rate]\nenabled = true\nthreshold_percent = 12.5\n[window]\nkind = \"time\"\n",
        )
        .unwrap();
        policy.apply(&patch);
        let written = toml::to_string(&AsWritten(&policy)).unwrap();
        assert!(written.contains("open_duration = \"1m 30s\""), "{written}");
        let mut read_back = BreakerPolicy::default();
        read_back.apply(&toml::from_str::<PolicyPatch>(&written).unwrap());
        assert_eq!(read_back, policy, "{written}");
    }

    #[test]
    fn patches_set_only_what_they_name() {
        let mut policy = BreakerPolicy::default();
        let patch: PolicyPatch = toml::from_str(
            "failure_threshold = 3\nopen_duration = \"1m\"\n[failure_rate]\nthreshold_percent = 25\n",
        )
        .unwrap();
        policy.apply(&patch);
        assert_eq!(policy.failure_threshold, 3);
        assert_eq!(policy.open_duration, Duration::from_secs(60));
        assert_eq!(policy.failure_rate.threshold_percent, Percent::new(25));
        // Untouched, including the sibling field of a patched section.
        assert!(!policy.failure_rate.enabled);
        assert_eq!(policy.half_open_probes, 1);
    }

    #[test]
    fn derived_limits_follow_the_documented_caps() {
        let policy = BreakerPolicy {
            success_threshold: 5,
            half_open_probes: 2,
            max_open_duration: Duration::from_secs(1),
            ..BreakerPolicy::default()
        };
        assert_eq!(policy.probes_to_close(), 2);
        assert_eq!(policy.open_duration_cap(), policy.open_duration);
        let mut policy = BreakerPolicy::default();
        policy.window.calls = 10;
        assert_eq!(policy.window_minimum_calls(), 10);
    }
}
