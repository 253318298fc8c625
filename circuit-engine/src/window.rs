//! Sliding windows over connect outcomes, O(1) per outcome and allocation-free after creation.
//!
//! - A count window remembers the last `calls` outcomes as two bit rings (failed, slow) plus
//!   running totals: 2 bits per call.
//! - A time window is a ring of `buckets` buckets of `length / buckets` each (bucket number
//!   `n = ⌊t / width⌋` is kept at `n % buckets`), plus running totals. At time `t` it covers the
//!   buckets `⌊t / width⌋ - buckets + 1 ..= ⌊t / width⌋`: the current, partly elapsed bucket
//!   and the `buckets - 1` before it, as resilience4j's time-based window does. Advancing the
//!   clock empties each elapsed bucket once, and at most `buckets` of them however long the
//!   gap.

use std::time::Duration;

use super::{
    clock::saturating_nanos,
    policy::{WindowKind, WindowPolicy},
};
use crate::clock::MonoTime;

/// What a window holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowTotals {
    pub calls: u32,
    pub failures: u32,
    /// Successful connects at or above the slow-connect latency.
    pub slow: u32,
}

impl WindowTotals {
    fn add(&mut self, failed: bool, slow: bool) {
        self.calls += 1;
        self.failures += u32::from(failed);
        self.slow += u32::from(slow);
    }

    fn remove(&mut self, other: &WindowTotals) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub fn new(policy: &WindowPolicy, now: MonoTime) -> Self {
        match policy.kind {
            WindowKind::Count => Window::Count(CountWindow::new(policy.calls)),
            WindowKind::Time => Window::Time(TimeWindow::new(policy.length, policy.buckets, now)),
        }
    }

    /// Whether this window has the shape `policy` asks for (else it must be rebuilt).
    pub fn fits(&self, policy: &WindowPolicy) -> bool {
        match (self, policy.kind) {
            (Window::Count(w), WindowKind::Count) => w.capacity == policy.calls,
            (Window::Time(w), WindowKind::Time) => {
                w.buckets.len() as u32 == policy.buckets
                    && w.bucket_nanos == TimeWindow::bucket_nanos(policy.length, policy.buckets)
            }
            _ => false,
        }
    }

    pub fn record(&mut self, now: MonoTime, failed: bool, slow: bool) {
        match self {
            Window::Count(w) => w.record(failed, slow),
            Window::Time(w) => w.record(now, failed, slow),
        }
    }

    /// The totals at `now` (a time window retires the buckets that have slid out).
    pub fn totals(&mut self, now: MonoTime) -> WindowTotals {
        match self {
            Window::Count(w) => w.totals,
            Window::Time(w) => {
                w.advance(now);
                w.totals
            }
        }
    }

    /// Forgets every outcome (a breaker starts fresh metrics in each state, as resilience4j).
    pub fn clear(&mut self) {
        match self {
            Window::Count(w) => w.clear(),
            Window::Time(w) => w.clear(),
        }
    }

    /// Heap memory of this window when boxed, for the per-upstream memory estimate.
    pub fn heap_bytes(&self) -> usize {
        size_of::<Self>()
            + match self {
                Window::Count(w) => (w.failed.len() + w.slow.len()) * size_of::<u64>(),
                Window::Time(w) => w.buckets.len() * size_of::<Bucket>(),
            }
    }

    /// Heap memory a boxed window for `policy` would hold.
    pub fn heap_bytes_for(policy: &WindowPolicy) -> usize {
        size_of::<Self>()
            + match policy.kind {
                WindowKind::Count => 2 * (policy.calls as usize).div_ceil(64) * size_of::<u64>(),
                WindowKind::Time => policy.buckets as usize * size_of::<Bucket>(),
            }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountWindow {
    failed: Box<[u64]>,
    slow: Box<[u64]>,
    capacity: u32,
    /// Position the next outcome is written to (the oldest once full).
    next: u32,
    len: u32,
    totals: WindowTotals,
}

impl CountWindow {
    fn new(capacity: u32) -> Self {
        let words = (capacity as usize).div_ceil(64);
        Self {
            failed: vec![0; words].into_boxed_slice(),
            slow: vec![0; words].into_boxed_slice(),
            capacity,
            next: 0,
            len: 0,
            totals: WindowTotals::default(),
        }
    }

    fn record(&mut self, failed: bool, slow: bool) {
        let (word, bit) = ((self.next / 64) as usize, 1u64 << (self.next % 64));
        if self.len == self.capacity {
            let oldest = WindowTotals {
                calls: 1,
                failures: u32::from(self.failed[word] & bit != 0),
                slow: u32::from(self.slow[word] & bit != 0),
            };
            self.totals.remove(&oldest);
        } else {
            self.len += 1;
        }
        set_bit(&mut self.failed[word], bit, failed);
        set_bit(&mut self.slow[word], bit, slow);
        self.totals.add(failed, slow);
        self.next = (self.next + 1) % self.capacity;
    }

    fn clear(&mut self) {
        self.failed.fill(0);
        self.slow.fill(0);
        self.next = 0;
        self.len = 0;
        self.totals = WindowTotals::default();
    }
}

fn set_bit(word: &mut u64, bit: u64, value: bool) {
    if value {
        *word |= bit;
    } else {
        *word &= !bit;
    }
}

/// The totals of one bucket number. The window's `buckets` numbers map one to one onto the
/// ring (`number % buckets`), and a bucket is emptied as its number slides out, so it needs
/// no tag saying which number it holds.
type Bucket = WindowTotals;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeWindow {
    buckets: Box<[Bucket]>,
    bucket_nanos: u64,
    /// The newest bucket number the totals are up to date with.
    newest: u64,
    /// Where bucket `newest` is kept (`newest % buckets`), followed as the window slides so
    /// that an outcome needs no division to find its bucket.
    newest_index: u32,
    /// When bucket `newest + 1` starts: outcomes before it need no division to know that
    /// the window has not moved.
    next_start: u64,
    totals: WindowTotals,
}

impl TimeWindow {
    fn bucket_nanos(length: Duration, buckets: u32) -> u64 {
        (saturating_nanos(length) / u64::from(buckets)).max(1)
    }

    fn new(length: Duration, buckets: u32, now: MonoTime) -> Self {
        let bucket_nanos = Self::bucket_nanos(length, buckets);
        let mut window = Self {
            buckets: vec![Bucket::default(); buckets as usize].into_boxed_slice(),
            bucket_nanos,
            newest: 0,
            newest_index: 0,
            next_start: 0,
            totals: WindowTotals::default(),
        };
        window.move_newest_to(now.as_nanos() / bucket_nanos);
        window
    }

    fn move_newest_to(&mut self, number: u64) {
        self.newest = number;
        self.newest_index = (number % self.buckets.len() as u64) as u32;
        self.next_start = (number + 1).saturating_mul(self.bucket_nanos);
    }

    /// Retires the buckets that slid out of the window by `now`.
    fn advance(&mut self, now: MonoTime) {
        let now = now.as_nanos();
        if now < self.next_start {
            return;
        }
        let current = now / self.bucket_nanos;
        if current <= self.newest {
            return;
        }
        if current - self.newest >= self.buckets.len() as u64 {
            // Every bucket slid out.
            self.clear();
            self.move_newest_to(current);
            return;
        }
        // Each bucket number entering the window takes the bucket of the one `buckets`
        // before it, which slides out.
        for _ in self.newest..current {
            self.newest_index += 1;
            if self.newest_index as usize == self.buckets.len() {
                self.newest_index = 0;
            }
            let retired = std::mem::take(&mut self.buckets[self.newest_index as usize]);
            self.totals.remove(&retired);
        }
        self.newest = current;
        self.next_start = (current + 1).saturating_mul(self.bucket_nanos);
    }

    fn record(&mut self, now: MonoTime, failed: bool, slow: bool) {
        self.advance(now);
        self.buckets[self.newest_index as usize].add(failed, slow);
        self.totals.add(failed, slow);
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
        self.totals = WindowTotals::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> MonoTime {
        MonoTime::from_nanos(s * 1_000_000_000)
    }

    fn count_policy(calls: u32) -> WindowPolicy {
        WindowPolicy {
            kind: WindowKind::Count,
            calls,
            ..WindowPolicy::default()
        }
    }

    fn time_policy(length_secs: u64, buckets: u32) -> WindowPolicy {
        WindowPolicy {
            kind: WindowKind::Time,
            length: Duration::from_secs(length_secs),
            buckets,
            ..WindowPolicy::default()
        }
    }

    #[test]
    fn count_window_forgets_the_oldest_outcome() {
        let mut w = Window::new(&count_policy(3), secs(0));
        w.record(secs(0), true, false);
        w.record(secs(0), false, true);
        w.record(secs(0), true, false);
        let full = WindowTotals {
            calls: 3,
            failures: 2,
            slow: 1,
        };
        assert_eq!(w.totals(secs(0)), full);
        w.record(secs(0), false, false); // pushes out the first failure
        assert_eq!(
            w.totals(secs(0)),
            WindowTotals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.clear();
        assert_eq!(w.totals(secs(0)), WindowTotals::default());
    }

    #[test]
    fn count_window_spans_word_boundaries() {
        let mut w = Window::new(&count_policy(130), secs(0));
        for i in 0..300 {
            w.record(secs(0), i % 2 == 0, i % 3 == 0);
        }
        // The last 130 of 0..300 are 170..300: 65 even, and multiples of 3 from 171 to 297.
        assert_eq!(
            w.totals(secs(0)),
            WindowTotals {
                calls: 130,
                failures: 65,
                slow: 43
            }
        );
    }

    #[test]
    fn time_window_slides_bucket_by_bucket() {
        let mut w = Window::new(&time_policy(10, 10), secs(100));
        w.record(secs(100), true, false);
        w.record(secs(105), false, false);
        assert_eq!(w.totals(secs(109)).calls, 2);
        // At 110 the bucket of 100 is 10 buckets old: out.
        assert_eq!(
            w.totals(secs(110)),
            WindowTotals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        assert_eq!(w.totals(secs(115)).calls, 0);
        // A gap longer than the window retires everything at once.
        w.record(secs(116), true, true);
        assert_eq!(w.totals(secs(1_000)).calls, 0);
        w.record(secs(1_000), true, false);
        assert_eq!(
            w.totals(secs(1_000)),
            WindowTotals {
                calls: 1,
                failures: 1,
                slow: 0
            }
        );
    }

    #[test]
    fn fits_detects_a_changed_shape() {
        let w = Window::new(&count_policy(10), secs(0));
        assert!(w.fits(&count_policy(10)));
        assert!(!w.fits(&count_policy(11)));
        assert!(!w.fits(&time_policy(10, 10)));
        let t = Window::new(&time_policy(10, 10), secs(0));
        assert!(t.fits(&time_policy(10, 10)));
        assert!(!t.fits(&time_policy(20, 10)));
        assert_eq!(t.heap_bytes(), Window::heap_bytes_for(&time_policy(10, 10)));
        assert_eq!(w.heap_bytes(), Window::heap_bytes_for(&count_policy(10)));
    }
}
