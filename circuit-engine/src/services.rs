//! Services: virtual addresses (a Kubernetes Service's ClusterIP and port, a Docker port
//! map, any DNAT) and the endpoints their NAT was seen to pick.
//!
//! Breakers are per endpoint: an outcome names the endpoint the NAT picked and the virtual
//! address beside it. A service is learned from those outcomes alone (no Kubernetes API):
//! each NAT decision observed adds its endpoint, and an endpoint with no outcome for
//! `idle_after` is forgotten. The service's own state is derived from its endpoints'
//! breakers: OPEN only when every known endpoint is OPEN.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Duration,
};

use crate::{MonoTime, Percent, Selector, policy::layered_section};

layered_section! {
    /// Endpoints behind virtual addresses (`[services]`).
    pub struct ServicesConfig / ServicesPatch {
        /// While some endpoints of a service are isolated and others are not, the cgroup
        /// connect hook sends connects to the virtual address to an admitted endpoint
        /// instead, picked at random as the NAT would (getpeername() still shows the
        /// virtual address). When none is isolated nothing is touched. Default true.
        pub reroute: bool = true,
        /// Virtual addresses never re-routed: services that rely on session affinity
        /// (`sessionAffinity: ClientIP`). Their endpoints still have breakers, and the
        /// service still fails fast once every endpoint is isolated.
        pub no_reroute: Vec<Selector> = Vec::new(),
        /// Never isolate more than this share of a service's known endpoints, counted per
        /// service. Default 100: re-routing keeps the clients of a service whole as long as
        /// one endpoint is healthy, and with every endpoint down failing fast is right.
        /// Lower it to keep sending traffic to endpoints beyond that share.
        pub max_ejection_percent: Percent = Percent::HUNDRED,
        /// An endpoint not seen behind its service's NAT for this long is forgotten (the
        /// service with its last one). Only the NAT says which endpoints a service has now,
        /// and while connects are re-routed it decides none: so this is also how often a
        /// re-routed service goes back to its NAT to learn its current endpoints (a pod
        /// replaced or added), at the cost of about one connect per isolated endpoint
        /// reaching it before the route is back. Default 60 s.
        pub relearn_after: Duration = Duration::from_secs(60),
    }
}

/// The derived state of a service.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// No endpoint is isolated: the NAT decides, untouched.
    Healthy,
    /// Some endpoints are isolated, some not: connects are re-routed (if enabled).
    Degraded,
    /// Every known endpoint is isolated: connects to the service fail fast.
    Open,
}

/// The services learned so far.
#[derive(Debug, Default)]
pub struct ServiceBook {
    services: HashMap<SocketAddr, Service>,
    /// Endpoint → the services it was seen behind (nearly always one).
    behind: HashMap<SocketAddr, Vec<SocketAddr>>,
}

#[derive(Debug, Default)]
struct Service {
    /// Each endpoint with its last outcome.
    endpoints: BTreeMap<SocketAddr, MonoTime>,
}

impl ServiceBook {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Notes that the NAT of `service` picked `endpoint` (it stays known for
    /// `relearn_after`); true when the endpoint is new.
    pub fn learn(&mut self, service: SocketAddr, endpoint: SocketAddr, now: MonoTime) -> bool {
        let entry = self.services.entry(service).or_default();
        let new = entry.endpoints.insert(endpoint, now).is_none();
        if new {
            self.behind.entry(endpoint).or_default().push(service);
        }
        new
    }

    /// Whether `addr` is a virtual address with known endpoints.
    pub fn is_service(&self, addr: &SocketAddr) -> bool {
        self.services.contains_key(addr)
    }

    /// The services `endpoint` was seen behind.
    pub fn services_of(&self, endpoint: &SocketAddr) -> &[SocketAddr] {
        self.behind.get(endpoint).map_or(&[], Vec::as_slice)
    }

    /// The known endpoints of `service`, in address order.
    pub fn endpoints(&self, service: &SocketAddr) -> impl Iterator<Item = SocketAddr> + '_ {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|s| s.endpoints.keys().copied())
    }

    /// Whether `service` was never seen before `learn` made it (for [`Self::learn`]'s
    /// caller: a breaker that judged the virtual address as one upstream must go).
    pub fn knows(&self, service: &SocketAddr) -> bool {
        self.services.contains_key(service)
    }

    /// When the next endpoint is due to be forgotten, given `relearn_after`.
    pub fn next_forget(&self, relearn_after: Duration) -> Option<MonoTime> {
        self.services
            .values()
            .flat_map(|s| s.endpoints.values())
            .min()
            .map(|seen| seen.saturating_add(relearn_after))
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.services.keys().copied()
    }

    /// Forgets endpoints idle for `idle_after` (and services left with none); returns the
    /// (service, endpoint) pairs forgotten.
    pub fn forget_idle(
        &mut self,
        now: MonoTime,
        idle_after: Duration,
    ) -> Vec<(SocketAddr, SocketAddr)> {
        let mut forgotten = Vec::new();
        self.services.retain(|&service, entry| {
            entry.endpoints.retain(|&endpoint, seen| {
                let keep = seen.saturating_add(idle_after) > now;
                if !keep {
                    forgotten.push((service, endpoint));
                }
                keep
            });
            !entry.endpoints.is_empty()
        });
        for (service, endpoint) in &forgotten {
            if let Some(list) = self.behind.get_mut(endpoint) {
                list.retain(|s| s != service);
                if list.is_empty() {
                    self.behind.remove(endpoint);
                }
            }
        }
        forgotten
    }

    /// Heap bytes, roughly (for the memory figure).
    pub fn heap_bytes(&self) -> usize {
        let per_endpoint = 2 * (size_of::<SocketAddr>() + size_of::<MonoTime>()) + 16;
        self.behind.len() * per_endpoint
            + self.services.len() * (size_of::<SocketAddr>() + size_of::<Service>() + 16)
    }
}

/// The state a service with these endpoint isolation flags is in.
pub fn derive_state(isolated: impl IntoIterator<Item = bool>) -> ServiceState {
    let (mut any, mut all, mut n) = (false, true, 0);
    for isolated in isolated {
        any |= isolated;
        all &= isolated;
        n += 1;
    }
    match (n, any, all) {
        (0, _, _) | (_, false, _) => ServiceState::Healthy,
        (_, true, true) => ServiceState::Open,
        _ => ServiceState::Degraded,
    }
}

impl std::fmt::Display for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServiceState::Healthy => "HEALTHY",
            ServiceState::Degraded => "DEGRADED",
            ServiceState::Open => "OPEN",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_are_learned_from_nat_decisions_and_forgotten_when_idle() {
        let mut book = ServiceBook::default();
        let vip = addr("10.96.0.10:80");
        let t0 = MonoTime::from_nanos(1_000);
        assert!(book.learn(vip, addr("10.1.0.1:8080"), t0));
        assert!(!book.learn(vip, addr("10.1.0.1:8080"), t0), "known already");
        assert!(book.learn(vip, addr("10.1.0.2:8080"), t0));
        assert!(book.is_service(&vip));
        assert_eq!(book.services_of(&addr("10.1.0.2:8080")), &[vip]);

        let later = t0.saturating_add(Duration::from_secs(50));
        book.learn(vip, addr("10.1.0.1:8080"), later);
        let forgotten = book.forget_idle(
            t0.saturating_add(Duration::from_secs(60)),
            Duration::from_secs(30),
        );
        assert_eq!(forgotten, vec![(vip, addr("10.1.0.2:8080"))]);
        assert_eq!(
            book.endpoints(&vip).collect::<Vec<_>>(),
            vec![addr("10.1.0.1:8080")]
        );
        assert!(book.services_of(&addr("10.1.0.2:8080")).is_empty());

        book.forget_idle(
            t0.saturating_add(Duration::from_secs(200)),
            Duration::from_secs(30),
        );
        assert!(
            book.is_empty(),
            "a service with no endpoint left is forgotten"
        );
    }

    #[test]
    fn a_service_is_open_only_when_every_endpoint_is() {
        assert_eq!(derive_state([]), ServiceState::Healthy);
        assert_eq!(derive_state([false, false]), ServiceState::Healthy);
        assert_eq!(derive_state([true, false, false]), ServiceState::Degraded);
        assert_eq!(derive_state([true, true, false]), ServiceState::Degraded);
        assert_eq!(derive_state([true, true, true]), ServiceState::Open);
    }
}
