//! Which CLOSED breaker goes when the tracking bound needs room, and how often a client may
//! make one go.
//!
//! A CLOSED breaker that has seen failures lately is part way to a trip: dropping it resets
//! that count, so an upstream that fails slowly (timeouts) never reaches its threshold while
//! something churns through `max_upstreams`. So breakers with no failure history go first,
//! least recently active first, and those with one only when no other is left. And each
//! client may push breakers out at most at `client_evictions_per_second` (a burst of ten
//! seconds' worth): one process naming new upstreams as fast as it can churns only its own
//! share.

use std::collections::HashMap;

use super::{lru::LruList, witness::ClientId};
use crate::clock::MonoTime;

/// The evictable (CLOSED, not held) breakers in two least-recently-active orders.
#[derive(Clone, Debug, Default)]
pub struct EvictionOrder {
    clean: LruList,
    failing: LruList,
}

impl EvictionOrder {
    /// Puts slot `i` in the order its breaker now calls for: out (not evictable), with the
    /// clean ones, or with those that failed lately. A slot that changes lists is stamped
    /// `now`; one that stays keeps its stamp.
    pub fn place(&mut self, i: u32, evictable: bool, failed_lately: bool, now: MonoTime) {
        let (wanted, other) = if failed_lately {
            (&mut self.failing, &mut self.clean)
        } else {
            (&mut self.clean, &mut self.failing)
        };
        other.remove(i);
        if !evictable {
            wanted.remove(i);
        } else if !wanted.is_linked(i) {
            wanted.push_newest(i, now);
        }
    }

    pub fn touch(&mut self, i: u32, now: MonoTime) {
        self.clean.touch(i, now);
        self.failing.touch(i, now);
    }

    pub fn remove(&mut self, i: u32) {
        self.clean.remove(i);
        self.failing.remove(i);
    }

    /// The least recently active evictable breaker, whatever its history (idle expiry).
    pub fn oldest(&self) -> Option<(u32, MonoTime)> {
        match (self.clean.oldest(), self.failing.oldest()) {
            (Some(a), Some(b)) => Some(if a.1 <= b.1 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// The breaker to drop for room: the least recently active clean one, else the least
    /// recently active one with failures.
    pub fn victim(&self) -> Option<u32> {
        self.clean
            .oldest()
            .or(self.failing.oldest())
            .map(|(i, _)| i)
    }

    pub fn heap_bytes(&self) -> usize {
        self.clean.heap_bytes() + self.failing.heap_bytes()
    }
}

/// Clients whose budgets are kept at most; beyond, the full ones are forgotten (a full
/// budget is what a new client gets anyway).
const MAX_CLIENTS: usize = 4_096;

/// Each client's budget of evictions for room, a token bucket.
#[derive(Clone, Debug, Default)]
pub struct EvictionBudgets {
    buckets: HashMap<ClientId, (f64, MonoTime)>,
}

impl EvictionBudgets {
    /// Takes one eviction from `client`'s budget (`per_second`, a burst of ten seconds'
    /// worth); false when it is spent.
    pub fn take(&mut self, client: ClientId, per_second: u32, now: MonoTime) -> bool {
        let burst = f64::from(per_second) * 10.0;
        if self.buckets.len() >= MAX_CLIENTS && !self.buckets.contains_key(&client) {
            let rate = f64::from(per_second);
            self.buckets
                .retain(|_, (tokens, at)| *tokens + now.since(*at).as_secs_f64() * rate < burst);
            if self.buckets.len() >= MAX_CLIENTS {
                // That many clients busy at once: start everyone afresh rather than grow.
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(client).or_insert((burst, now));
        *tokens = (*tokens + now.since(*at).as_secs_f64() * f64::from(per_second)).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn clean_breakers_go_first_then_the_least_recently_active() {
        let t = MonoTime::from_nanos;
        let mut order = EvictionOrder::default();
        order.place(0, true, true, t(0)); // failed lately, oldest
        order.place(1, true, false, t(1));
        order.place(2, true, false, t(2));
        order.place(3, false, false, t(3)); // not evictable (OPEN)
        assert_eq!(order.victim(), Some(1));
        assert_eq!(order.oldest(), Some((0, t(0))));
        order.touch(1, t(5));
        assert_eq!(order.victim(), Some(2));
        // 2 fails: it joins the failing ones, stamped now.
        order.place(2, true, true, t(6));
        assert_eq!(order.victim(), Some(1));
        order.remove(1);
        assert_eq!(
            order.victim(),
            Some(0),
            "only failing ones left: the oldest"
        );
        // 3 closes: evictable, and clean.
        order.place(3, true, false, t(7));
        assert_eq!(order.victim(), Some(3));
        order.place(3, false, false, t(8));
        order.remove(0);
        order.remove(2);
        assert_eq!((order.victim(), order.oldest()), (None, None));
    }

    #[test]
    fn a_client_gets_a_burst_then_its_rate_and_others_are_untouched() {
        let start = MonoTime::from_nanos(1_000_000_000);
        let mut budgets = EvictionBudgets::default();
        let (a, b) = (ClientId(1), ClientId(2));
        let burst = (0..2_000).filter(|_| budgets.take(a, 100, start)).count();
        assert_eq!(burst, 1_000);
        assert!(budgets.take(b, 100, start), "another client has its own");
        let later = start.saturating_add(Duration::from_secs(1));
        let more = (0..2_000).filter(|_| budgets.take(a, 100, later)).count();
        assert_eq!(more, 100);
        // Many clients: memory stays bounded.
        for c in 0..10_000 {
            budgets.take(ClientId(100 + c), 100, later);
        }
        assert!(budgets.buckets.len() <= MAX_CLIENTS + 1);
    }
}
