//! Whose failure matters. Every outcome carries its client (the connecting process's
//! cgroup: in Kubernetes, a pod's container). A breaker isolates its upstream for the whole
//! node only on the word of enough distinct clients (`min_witnesses`) and while no client
//! contradicts them by connecting successfully; otherwise only the failing clients are
//! failed fast, each on its own (client-scoped holds, see [`ClientHolds`]).
//!
//! The detectors themselves (consecutive failures, failure rate, slow connects, adaptive)
//! count over the upstream's outcomes from every client, as before; this book decides who
//! a trip they want applies to.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::SocketAddr,
    time::Duration,
};

use crate::clock::MonoTime;

/// A client: the cgroup v2 id of the process that connected (0: unknown, for connects the
/// kernel saw start before circuit was loaded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl ClientId {
    pub const UNKNOWN: ClientId = ClientId(0);

    pub fn is_known(self) -> bool {
        self != Self::UNKNOWN
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cgroup:{}", self.0)
    }
}

/// Clients an upstream's book remembers at most; beyond, the least recently heard goes.
const BOOK_CLIENTS: usize = 16;

/// What one client has lately seen of an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClientRecord {
    client: ClientId,
    last_heard: MonoTime,
    /// Its first failure since it last had none for a window, and its last one.
    first_failure: Option<MonoTime>,
    last_failure: Option<MonoTime>,
    /// When it last connected successfully.
    last_success: Option<MonoTime>,
}

/// Who failed and who succeeded at one upstream lately. Allocated on the upstream's first
/// failure from a known client, dropped once nobody has failed for a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WitnessBook {
    clients: Vec<ClientRecord>,
}

/// What one client has lately seen of an upstream, for people (`inspect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientWitness {
    pub client: ClientId,
    pub last_failure: Option<MonoTime>,
    pub last_success: Option<MonoTime>,
}

/// Whom a wanted trip applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Enough witnesses and nobody contradicting: isolate for every process (and XDP/TC).
    Node,
    /// Only these clients, each failed fast on its own; `contradicted` says whether a client
    /// connecting successfully (rather than too few witnesses) kept it from the node.
    Clients {
        witnesses: Vec<ClientId>,
        contradicted: bool,
    },
}

impl WitnessBook {
    /// Records an outcome of `client` that was a failure (`failed`) or a success. Outcomes
    /// nobody is known for count as one client of their own, "unattributed": alone they
    /// are one witness, never enough for the node unless `min_witnesses` is 1.
    pub fn record(&mut self, client: ClientId, failed: bool, now: MonoTime) {
        let i = match self.clients.iter().position(|r| r.client == client) {
            Some(i) => i,
            None => {
                if self.clients.len() == BOOK_CLIENTS
                    && let Some(oldest) =
                        (0..self.clients.len()).min_by_key(|&i| self.clients[i].last_heard)
                {
                    self.clients.swap_remove(oldest);
                }
                self.clients.push(ClientRecord {
                    client,
                    last_heard: now,
                    first_failure: None,
                    last_failure: None,
                    last_success: None,
                });
                self.clients.len() - 1
            }
        };
        let record = &mut self.clients[i];
        record.last_heard = now;
        if failed {
            if record.last_failure.is_none() {
                record.first_failure = Some(now);
            }
            record.last_failure = Some(now);
        } else {
            record.last_success = Some(now);
        }
    }

    /// Forgets what is older than `window`: failures, successes, then silent clients; true
    /// when nothing is left.
    pub fn expire(&mut self, window: Duration, now: MonoTime) -> bool {
        let stale = |at: Option<MonoTime>| at.is_some_and(|at| at.saturating_add(window) <= now);
        for r in &mut self.clients {
            if stale(r.last_failure) {
                (r.first_failure, r.last_failure) = (None, None);
            }
            if stale(r.last_success) {
                r.last_success = None;
            }
        }
        self.clients
            .retain(|r| r.last_heard.saturating_add(window) > now);
        self.clients.is_empty()
    }

    /// The clients in the book, most recently heard first.
    pub fn clients(&self) -> Vec<ClientWitness> {
        let mut clients: Vec<&ClientRecord> = self.clients.iter().collect();
        clients.sort_by_key(|r| std::cmp::Reverse(r.last_heard));
        clients
            .into_iter()
            .map(|r| ClientWitness {
                client: r.client,
                last_failure: r.last_failure,
                last_success: r.last_success,
            })
            .collect()
    }

    /// Whom a trip wanted now applies to. Witnesses are the clients with a failure within
    /// `window`; a client with only successes since the first of those failures contradicts
    /// them (one that also failed is a witness: a partial outage fails everyone now and
    /// then). The node when at least `min_witnesses` witnesses and no contradiction;
    /// otherwise the witnesses alone.
    pub fn scope(&self, min_witnesses: u32, window: Duration, now: MonoTime) -> Scope {
        let tally = self.tally(window, now);
        if tally.is_node_wide(min_witnesses) {
            return Scope::Node;
        }
        let mut witnesses: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|r| witnessing(r, window, now))
            .map(|r| r.client)
            .collect();
        witnesses.sort();
        Scope::Clients {
            witnesses,
            contradicted: tally.contradicted,
        }
    }

    /// Whether a trip now would apply to the node: [`WitnessBook::scope`] without listing
    /// the witnesses, so asking it on every failure allocates nothing.
    pub fn is_node_wide(&self, min_witnesses: u32, window: Duration, now: MonoTime) -> bool {
        self.tally(window, now).is_node_wide(min_witnesses)
    }

    fn tally(&self, window: Duration, now: MonoTime) -> Tally {
        let mut witnesses = 0usize;
        let mut first_failure: Option<MonoTime> = None;
        for r in self.clients.iter().filter(|r| witnessing(r, window, now)) {
            witnesses += 1;
            first_failure = match (first_failure, r.first_failure) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let contradicted = first_failure.is_some_and(|first| {
            self.clients.iter().any(|r| {
                !witnessing(r, window, now)
                    && recent(r.last_success, window, now)
                    && r.last_success >= Some(first)
            })
        });
        Tally {
            witnesses,
            contradicted,
        }
    }
}

/// A client with a failure within the witness window is a witness.
fn witnessing(r: &ClientRecord, window: Duration, now: MonoTime) -> bool {
    recent(r.last_failure, window, now)
}

fn recent(at: Option<MonoTime>, window: Duration, now: MonoTime) -> bool {
    at.is_some_and(|at| at.saturating_add(window) > now)
}

/// The witnesses' count, and whether a client that only succeeded since contradicts them.
struct Tally {
    witnesses: usize,
    contradicted: bool,
}

impl Tally {
    fn is_node_wide(&self, min_witnesses: u32) -> bool {
        !self.contradicted && self.witnesses >= min_witnesses.max(1) as usize
    }
}

/// Clients failed fast at one upstream without isolating it for anyone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHold {
    pub upstream: SocketAddr,
    pub client: ClientId,
    pub until: MonoTime,
    /// A METRICS_ONLY breaker's would-be hold: nothing is rejected.
    pub dry_run: bool,
}

/// Every client-scoped hold, with their expiries in order.
#[derive(Debug, Default)]
pub struct ClientHolds {
    holds: HashMap<(SocketAddr, ClientId), ClientHold>,
    expiries: BTreeSet<(MonoTime, SocketAddr, ClientId)>,
}

impl ClientHolds {
    /// Holds `client` at `upstream` until `until`; false when it was already held.
    pub fn hold(&mut self, hold: ClientHold) -> bool {
        let key = (hold.upstream, hold.client);
        if self.holds.contains_key(&key) {
            return false;
        }
        self.expiries
            .insert((hold.until, hold.upstream, hold.client));
        self.holds.insert(key, hold);
        true
    }

    /// Lifts every hold at `upstream` (a node-wide verdict or an operator took over).
    pub fn release_upstream(&mut self, upstream: SocketAddr) -> Vec<ClientHold> {
        let keys: Vec<_> = self
            .holds
            .keys()
            .filter(|(u, _)| *u == upstream)
            .copied()
            .collect();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }

    fn remove(&mut self, key: (SocketAddr, ClientId)) -> Option<ClientHold> {
        let hold = self.holds.remove(&key)?;
        self.expiries
            .remove(&(hold.until, hold.upstream, hold.client));
        Some(hold)
    }

    /// Removes and returns the holds that end at or before `now`.
    pub fn expire(&mut self, now: MonoTime) -> Vec<ClientHold> {
        let mut ended = Vec::new();
        while let Some(&(until, upstream, client)) = self.expiries.first()
            && until <= now
        {
            ended.extend(self.remove((upstream, client)));
        }
        ended
    }

    pub fn next_deadline(&self) -> Option<MonoTime> {
        self.expiries.first().map(|&(at, _, _)| at)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ClientHold> {
        self.holds.values()
    }

    pub fn of(&self, upstream: SocketAddr) -> impl Iterator<Item = &ClientHold> {
        self.holds.values().filter(move |h| h.upstream == upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> MonoTime {
        MonoTime::from_nanos(ms * 1_000_000)
    }

    const A: ClientId = ClientId(11);
    const B: ClientId = ClientId(12);
    const C: ClientId = ClientId(13);
    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn one_failing_client_is_not_enough_for_the_node() {
        let mut book = WitnessBook::default();
        for ms in 0..5 {
            book.record(A, true, t(ms));
        }
        assert_eq!(
            book.scope(2, WINDOW, t(10)),
            Scope::Clients {
                witnesses: vec![A],
                contradicted: false
            }
        );
        assert_eq!(
            book.scope(1, WINDOW, t(10)),
            Scope::Node,
            "1 restores one witness"
        );
    }

    #[test]
    fn two_failing_clients_isolate_for_the_node() {
        let mut book = WitnessBook::default();
        book.record(A, true, t(0));
        book.record(B, true, t(1));
        assert_eq!(book.scope(2, WINDOW, t(2)), Scope::Node);
        // Unattributed failures are one witness, whatever their number.
        let mut book = WitnessBook::default();
        for ms in 0..5 {
            book.record(ClientId::UNKNOWN, true, t(ms));
        }
        assert!(matches!(book.scope(2, WINDOW, t(6)), Scope::Clients { .. }));
        assert_eq!(book.scope(1, WINDOW, t(6)), Scope::Node);
    }

    #[test]
    fn a_client_connecting_meanwhile_contradicts_them() {
        let mut book = WitnessBook::default();
        book.record(A, true, t(0));
        book.record(C, false, t(5));
        book.record(B, true, t(10));
        assert_eq!(
            book.scope(2, WINDOW, t(11)),
            Scope::Clients {
                witnesses: vec![A, B],
                contradicted: true
            }
        );
        // A success from before the failures began says nothing about them.
        let mut book = WitnessBook::default();
        book.record(C, false, t(0));
        book.record(A, true, t(5));
        book.record(B, true, t(10));
        assert_eq!(book.scope(2, WINDOW, t(11)), Scope::Node);
        // A client that succeeds and fails is a witness, not a contradiction: a partial
        // outage (a failure rate) fails every client now and then.
        let mut book = WitnessBook::default();
        book.record(A, true, t(0));
        book.record(B, true, t(1));
        book.record(B, false, t(2));
        book.record(A, false, t(3));
        assert_eq!(book.scope(2, WINDOW, t(4)), Scope::Node);
    }

    #[test]
    fn old_failures_witness_nothing_and_the_book_empties() {
        let mut book = WitnessBook::default();
        book.record(A, true, t(0));
        book.record(B, true, t(61_000));
        assert_eq!(
            book.scope(2, WINDOW, t(61_001)),
            Scope::Clients {
                witnesses: vec![B],
                contradicted: false
            }
        );
        assert!(!book.expire(WINDOW, t(61_001)));
        assert!(book.expire(WINDOW, t(200_000)));
    }

    #[test]
    fn the_book_is_bounded() {
        let mut book = WitnessBook::default();
        for c in 1..=100 {
            book.record(ClientId(c), true, t(c));
        }
        assert_eq!(book.clients.len(), BOOK_CLIENTS);
        assert!(book.clients.iter().any(|r| r.client == ClientId(100)));
    }

    #[test]
    fn holds_expire_in_order_and_once() {
        let up: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut holds = ClientHolds::default();
        let hold = |client, until| ClientHold {
            upstream: up,
            client,
            until,
            dry_run: false,
        };
        assert!(holds.hold(hold(A, t(20))));
        assert!(!holds.hold(hold(A, t(30))), "already held");
        assert!(holds.hold(hold(B, t(10))));
        assert_eq!(holds.next_deadline(), Some(t(10)));
        assert_eq!(holds.expire(t(15)), vec![hold(B, t(10))]);
        assert_eq!(holds.expire(t(15)), vec![]);
        assert_eq!(holds.release_upstream(up), vec![hold(A, t(20))]);
        assert_eq!(holds.iter().count(), 0);
    }
}
