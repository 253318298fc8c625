//! How long a breaker stays open: the ejection multiplier with its decay, flapping, jitter.
//!
//! The n-th ejection lasts `open_duration × n` (linear, Envoy) or
//! `open_duration × multiplier^(n-1)` (exponential), times the flapping multiplier while the
//! upstream flaps, capped at `max_open_duration`, plus a uniform jitter in
//! `[0, open_jitter]`. As in Envoy, `n` stops growing once the grown duration passes the cap
//! by one base duration, and each `backoff_decay` spent CLOSED forgets one ejection (counted
//! lazily at the next trip, so no timer is needed).

use std::{fmt, time::Duration};

use super::{
    clock::saturating_nanos,
    policy::{BackoffKind, BreakerPolicy, MAX_FLAP_TRIPS},
    units::format_millis,
};
use crate::clock::MonoTime;

/// The random source for jitter: SplitMix64, seeded by the caller so tests are deterministic.
/// Jitter only needs spread, not unpredictability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitterRng(u64);

impl JitterRng {
    pub const fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration uniform in `[0, max]` (to the nanosecond).
    pub fn up_to(&mut self, max: Duration) -> Duration {
        let max_nanos = saturating_nanos(max);
        if max_nanos == 0 {
            return Duration::ZERO;
        }
        // Multiply-shift maps 64 random bits onto [0, max] with negligible bias.
        let nanos = (u128::from(self.next_u64()) * (u128::from(max_nanos) + 1)) >> 64;
        Duration::from_nanos(nanos as u64)
    }
}

/// One open period and the numbers behind its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenPeriod {
    /// The whole period, jitter included.
    pub duration: Duration,
    /// Which ejection this is, after decay (1 for the first).
    pub ejection: u32,
    /// Trips within the flapping window when the upstream is flapping.
    pub flapping_trips: Option<u32>,
    /// The random part of `duration`.
    pub jitter: Duration,
}

impl fmt::Display for OpenPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (ejection {}",
            format_millis(self.duration),
            self.ejection
        )?;
        if let Some(trips) = self.flapping_trips {
            write!(f, ", flapping: {trips} trips")?;
        }
        if !self.jitter.is_zero() {
            write!(f, ", jitter {}", format_millis(self.jitter))?;
        }
        f.write_str(")")
    }
}

/// The ejection multiplier of one breaker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    /// Ejections that still count (Envoy's `ejectTimeBackoff`).
    ejections: u32,
    /// When the breaker last closed after being open: decay runs from there.
    closed_at: Option<MonoTime>,
}

impl Backoff {
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// The breaker closed: from now on, healthy time forgets ejections.
    pub fn closed(&mut self, now: MonoTime) {
        self.closed_at = Some(now);
    }

    /// The next open period. `from_closed` is true for a trip (the healthy time since the
    /// last close decays the multiplier first) and false for a re-open from HALF_OPEN.
    pub fn next_period(
        &mut self,
        policy: &BreakerPolicy,
        now: MonoTime,
        from_closed: bool,
        flapping_trips: Option<u32>,
        rng: &mut JitterRng,
    ) -> OpenPeriod {
        if from_closed && let Some(closed_at) = self.closed_at.take() {
            let healthy = now.since(closed_at);
            let forgotten = healthy.as_nanos() / policy.backoff_decay.as_nanos().max(1);
            self.ejections = self
                .ejections
                .saturating_sub(u32::try_from(forgotten).unwrap_or(u32::MAX));
        }
        let cap = policy.open_duration_cap();
        if grown(policy, self.ejections) < cap.saturating_add(policy.open_duration) {
            self.ejections += 1;
        }
        let mut base = grown(policy, self.ejections);
        if flapping_trips.is_some() {
            base = scale(base, policy.flapping.multiplier.as_f64());
        }
        let jitter = rng.up_to(policy.open_jitter);
        OpenPeriod {
            duration: base.min(cap).saturating_add(jitter),
            ejection: self.ejections,
            flapping_trips,
            jitter,
        }
    }
}

/// The uncapped open duration of the n-th ejection (0 for n = 0).
fn grown(policy: &BreakerPolicy, n: u32) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    match policy.backoff {
        BackoffKind::Linear => policy.open_duration.saturating_mul(n),
        BackoffKind::Exponential => {
            let exponent = i32::try_from(n - 1).unwrap_or(i32::MAX);
            scale(
                policy.open_duration,
                policy.backoff_multiplier.as_f64().powi(exponent),
            )
        }
    }
}

fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// When the breaker last tripped, for flapping detection: a fixed ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlapHistory {
    trips: [MonoTime; MAX_FLAP_TRIPS as usize],
    next: u8,
    len: u8,
}

impl FlapHistory {
    /// No trips yet.
    pub const EMPTY: Self = Self {
        trips: [MonoTime(0); MAX_FLAP_TRIPS as usize],
        next: 0,
        len: 0,
    };

    pub fn record_trip(&mut self, now: MonoTime) {
        self.trips[usize::from(self.next)] = now;
        self.next = (self.next + 1) % MAX_FLAP_TRIPS as u8;
        self.len = (self.len + 1).min(MAX_FLAP_TRIPS as u8);
    }

    /// Trips within `policy.flapping.window` before `now`, when that makes the upstream
    /// flapping.
    pub fn flapping_trips(&self, policy: &BreakerPolicy, now: MonoTime) -> Option<u32> {
        let flapping = &policy.flapping;
        if !flapping.enabled {
            return None;
        }
        let recent = self.trips[..usize::from(self.len)]
            .iter()
            .filter(|&&at| now.since(at) <= flapping.window)
            .count() as u32;
        (recent >= flapping.trips).then_some(recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Factor;

    fn secs(s: u64) -> MonoTime {
        MonoTime::from_nanos(s * 1_000_000_000)
    }

    fn periods(policy: &BreakerPolicy, n: usize) -> Vec<u64> {
        let mut backoff = Backoff::default();
        let mut rng = JitterRng::seeded(1);
        (0..n)
            .map(|_| {
                backoff
                    .next_period(policy, secs(0), false, None, &mut rng)
                    .duration
                    .as_secs()
            })
            .collect()
    }

    #[test]
    fn linear_backoff_grows_by_the_base_up_to_the_cap() {
        let policy = BreakerPolicy::default();
        assert_eq!(
            periods(&policy, 12),
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
        );
    }

    #[test]
    fn exponential_backoff_multiplies() {
        let policy = BreakerPolicy {
            backoff: BackoffKind::Exponential,
            backoff_multiplier: Factor::from_thousandths(1_500),
            open_duration: Duration::from_secs(10),
            max_open_duration: Duration::from_secs(40),
            ..BreakerPolicy::default()
        };
        assert_eq!(periods(&policy, 6), [10, 15, 22, 33, 40, 40]);
    }

    #[test]
    fn healthy_time_forgets_ejections() {
        let policy = BreakerPolicy::default();
        let mut rng = JitterRng::seeded(1);
        let mut backoff = Backoff::default();
        for _ in 0..4 {
            backoff.next_period(&policy, secs(0), false, None, &mut rng);
        }
        backoff.closed(secs(100));
        // 25 s closed forgets two of the four ejections (decay 10 s): the next is the third.
        let p = backoff.next_period(&policy, secs(125), true, None, &mut rng);
        assert_eq!((p.ejection, p.duration.as_secs()), (3, 90));
    }

    #[test]
    fn flapping_multiplies_and_jitter_stays_in_bounds() {
        let policy = BreakerPolicy {
            open_jitter: Duration::from_secs(5),
            ..BreakerPolicy::default()
        };
        let mut rng = JitterRng::seeded(7);
        let mut backoff = Backoff::default();
        let p = backoff.next_period(&policy, secs(0), true, Some(3), &mut rng);
        assert!(p.duration >= Duration::from_secs(60));
        assert!(p.duration <= Duration::from_secs(65));
        assert_eq!(p.duration - p.jitter, Duration::from_secs(60));
    }

    #[test]
    fn flap_history_counts_recent_trips() {
        let policy = BreakerPolicy::default();
        let mut flaps = FlapHistory::default();
        for at in [0, 100, 700, 800] {
            flaps.record_trip(secs(at));
        }
        // Window 10 min: at 800 the trips at 700, 800 and... 100 is 700 s old: out.
        assert_eq!(flaps.flapping_trips(&policy, secs(800)), None);
        flaps.record_trip(secs(850));
        assert_eq!(flaps.flapping_trips(&policy, secs(850)), Some(3));
        for at in 0..20 {
            flaps.record_trip(secs(900 + at));
        }
        assert_eq!(
            flaps.flapping_trips(&policy, secs(920)),
            Some(MAX_FLAP_TRIPS)
        );
    }

    #[test]
    fn jitter_is_deterministic_per_seed() {
        let (mut a, mut b) = (JitterRng::seeded(42), JitterRng::seeded(42));
        let max = Duration::from_millis(10);
        for _ in 0..100 {
            let x = a.up_to(max);
            assert_eq!(x, b.up_to(max));
            assert!(x <= max);
        }
    }
}
