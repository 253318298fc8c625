//! Time in the engine: nanoseconds on the kernel's monotonic clock. The clock is injected,
//! so every rule can be tested without sleeping; the agent supplies the real one.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// A point on the monotonic clock, in nanoseconds. The agent uses CLOCK_MONOTONIC, the clock
/// of `bpf_ktime_get_ns`, so kernel timestamps and lease expiries compare directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MonoTime(pub u64);

impl MonoTime {
    pub const fn from_nanos(ns: u64) -> Self {
        Self(ns)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(saturating_nanos(d)))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: MonoTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for MonoTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}s", self.0 as f64 / 1e9)
    }
}

/// Nanoseconds in `d`, saturating (a `Duration` can hold more than `u64` nanoseconds).
pub fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A monotonic clock: `now` never goes back. The engine relies on it (its timers and the
/// guard's activity marks are kept in time order as they are made).
pub trait Clock: Send + Sync {
    fn now(&self) -> MonoTime;
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start: MonoTime) -> Self {
        Self(Arc::new(AtomicU64::new(start.0)))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(saturating_nanos(d), Ordering::SeqCst);
    }

    /// Moves the clock to `t`, which must not be earlier than now (see [`Clock`]).
    pub fn set(&self, t: MonoTime) {
        let now = self.0.load(Ordering::SeqCst);
        assert!(
            t.0 >= now,
            "a monotonic clock cannot go back ({now} ns to {} ns)",
            t.0
        );
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    // An atomic load: worth inlining into the engine, which reads the clock on every outcome.
    #[inline]
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(Ordering::SeqCst))
    }
}
