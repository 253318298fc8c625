//! Time for the whole agent: nanoseconds on the kernel's monotonic clock. The engine takes
//! its clock injected, so every rule can be tested without sleeping.

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

/// CLOCK_MONOTONIC: the same clock as the kernel programs' `bpf_ktime_get_ns`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    /// The kernel's monotonic time, as BPF programs read it (`bpf_ktime_get_ns`): inside a
    /// time namespace CLOCK_MONOTONIC is offset, and the offset is taken back out.
    fn now(&self) -> MonoTime {
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .expect("CLOCK_MONOTONIC is always available on Linux");
        let ns = ts.tv_sec() as i128 * 1_000_000_000 + ts.tv_nsec() as i128;
        MonoTime((ns - i128::from(time_namespace_offset_ns())).max(0) as u64)
    }
}

/// How far this process's time namespace moves CLOCK_MONOTONIC (0 outside one, and on
/// kernels without time namespaces), read once.
fn time_namespace_offset_ns() -> i64 {
    use std::os::unix::fs::MetadataExt;
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        // The file shows the offsets of the namespace this process's children get, which
        // is its own only when both links name one namespace (on 5.10, `unshare --time`
        // without a fork leaves the process itself outside).
        let ns = |link: &str| std::fs::metadata(link).ok().map(|m| (m.dev(), m.ino()));
        if ns("/proc/self/ns/time") != ns("/proc/self/ns/time_for_children") {
            return 0;
        }
        std::fs::read_to_string("/proc/self/timens_offsets")
            .ok()
            .and_then(|text| monotonic_offset_ns(&text))
            .unwrap_or(0)
    })
}

/// The monotonic line of /proc/PID/timens_offsets ("monotonic <secs> <nanos>"), in ns.
fn monotonic_offset_ns(text: &str) -> Option<i64> {
    let line = text.lines().find(|l| l.starts_with("monotonic"))?;
    let mut fields = line.split_whitespace().skip(1);
    let secs: i64 = fields.next()?.parse().ok()?;
    let nanos: i64 = fields.next()?.parse().ok()?;
    Some(secs * 1_000_000_000 + nanos)
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

#[cfg(test)]
mod tests {
    #[test]
    fn time_namespace_offsets_are_parsed() {
        let text = "monotonic      86400         5\nboottime          0         0\n";
        assert_eq!(super::monotonic_offset_ns(text), Some(86_400_000_000_005));
        assert_eq!(super::monotonic_offset_ns("boottime 1 0\n"), None);
    }
}
