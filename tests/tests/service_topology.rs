//! The Service topology itself (`circuit_tests::service`), without an agent: the VIP is
//! DNATed at random to every endpoint, getpeername() keeps the VIP, and the endpoint modes
//! refuse or swallow connections, for IPv4 and IPv6 and both placements of the client.

use std::time::Duration;

use circuit_tests::require_root;
use circuit_tests::service::{
    EndpointMode, Family, Placement, RequestOutcome, RequestResult, ServiceTopology,
};

const ENDPOINTS: usize = 3;
const REQUESTS: usize = 60;
/// Plenty for a connect and a read across two veths.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The black-holed requests wait this long each, so it is kept short.
const BLACK_HOLE_TIMEOUT: Duration = Duration::from_millis(100);

const ALL: [(Placement, Family); 4] = [
    (Placement::HostClient, Family::V4),
    (Placement::HostClient, Family::V6),
    (Placement::PodClient, Family::V4),
    (Placement::PodClient, Family::V6),
];

fn topology(placement: Placement, family: Family) -> ServiceTopology {
    require_root().unwrap();
    ServiceTopology::new("cbsvt", placement, family, ENDPOINTS).unwrap()
}

fn requests(t: &ServiceTopology, n: usize, timeout: Duration) -> Vec<RequestOutcome> {
    (0..n).map(|_| t.request(timeout).unwrap()).collect()
}

fn count(outcomes: &[RequestOutcome], result: RequestResult) -> usize {
    outcomes.iter().filter(|o| o.result == result).count()
}

#[test]
fn every_request_succeeds_through_the_vip_and_every_endpoint_serves() {
    for (placement, family) in ALL {
        let t = topology(placement, family);
        let what = format!("{placement:?} {family:?}");
        let outcomes = requests(&t, REQUESTS, TIMEOUT);
        assert_eq!(
            count(&outcomes, RequestResult::Ok),
            REQUESTS,
            "{what}: {outcomes:?}"
        );
        // The translation is invisible to the client.
        assert!(
            outcomes.iter().all(|o| o.peer == Some(t.vip)),
            "{what}: {outcomes:?}"
        );
        let served = t.served();
        assert_eq!(served.iter().sum::<u64>(), REQUESTS as u64, "{what}");
        // Each endpoint is picked with p = 1/3: none in 60 has a chance of 3 × (2/3)^60.
        assert!(served.iter().all(|n| *n > 0), "{what}: {served:?}");
        assert_eq!(t.vip.port(), 80);
        assert!(t.endpoints.iter().all(|e| e.port() == 8080));
    }
}

#[test]
fn a_refusing_endpoint_fails_about_a_third_of_the_requests() {
    for (placement, family) in ALL {
        let t = topology(placement, family);
        let what = format!("{placement:?} {family:?}");
        t.set_mode(1, EndpointMode::Refusing).unwrap();
        let mut watch = t.watch_connections().unwrap();
        let outcomes = requests(&t, REQUESTS, TIMEOUT);
        let (ok, refused) = (
            count(&outcomes, RequestResult::Ok),
            count(&outcomes, RequestResult::Refused),
        );
        assert_eq!(ok + refused, REQUESTS, "{what}: {outcomes:?}");
        // Binomial(60, 1/3): mean 20, sd 3.7; 5..=40 is beyond 4 sd either way.
        assert!((5..=40).contains(&refused), "{what}: {refused} refused");
        assert_eq!(t.served()[1], 0, "{what}");
        // conntrack saw every connection, the refused ones at endpoint 1.
        let per_endpoint = watch.per_endpoint().unwrap();
        assert_eq!(per_endpoint[1], refused as u64, "{what}: {per_endpoint:?}");
        assert_eq!(
            per_endpoint.iter().sum::<u64>(),
            REQUESTS as u64,
            "{what}: {per_endpoint:?}"
        );

        // Back to serving: everything succeeds again.
        t.set_mode(1, EndpointMode::Serving).unwrap();
        let outcomes = requests(&t, 20, TIMEOUT);
        assert_eq!(
            count(&outcomes, RequestResult::Ok),
            20,
            "{what}: {outcomes:?}"
        );
    }
}

#[test]
fn a_black_holed_endpoint_makes_some_requests_time_out() {
    for (placement, family) in ALL {
        let t = topology(placement, family);
        let what = format!("{placement:?} {family:?}");
        t.set_mode(2, EndpointMode::BlackHoled).unwrap();
        let outcomes = requests(&t, 30, BLACK_HOLE_TIMEOUT);
        let timed_out = count(&outcomes, RequestResult::TimedOut);
        assert_eq!(
            count(&outcomes, RequestResult::Ok) + timed_out,
            30,
            "{what}: {outcomes:?}"
        );
        // Binomial(30, 1/3): none has a chance of (2/3)^30 = 5e-6.
        assert!(timed_out > 0, "{what}");
        assert!(
            outcomes
                .iter()
                .filter(|o| o.result == RequestResult::TimedOut)
                .all(|o| o.elapsed >= BLACK_HOLE_TIMEOUT),
            "{what}: {outcomes:?}"
        );
        assert_eq!(t.served()[2], 0, "{what}");
    }
}

#[test]
fn every_endpoint_refusing_refuses_every_request_and_modes_change_together() {
    let t = topology(Placement::HostClient, Family::V4);
    t.set_modes(&[EndpointMode::Refusing; ENDPOINTS]).unwrap();
    let outcomes = requests(&t, 20, TIMEOUT);
    assert_eq!(count(&outcomes, RequestResult::Refused), 20, "{outcomes:?}");
    assert_eq!(t.modes(), vec![EndpointMode::Refusing; ENDPOINTS]);
    t.set_modes(&[EndpointMode::Serving; ENDPOINTS]).unwrap();
    let outcomes = requests(&t, 20, TIMEOUT);
    assert_eq!(count(&outcomes, RequestResult::Ok), 20, "{outcomes:?}");
}

#[test]
fn the_topology_describes_itself() {
    let v4 = topology(Placement::PodClient, Family::V4);
    let v6 = topology(Placement::HostClient, Family::V6);
    for t in [&v4, &v6] {
        let cidrs = t.cidrs();
        assert_eq!(cidrs.len(), 2, "{cidrs:?}");
        assert!(t.vip.is_ipv4() == (t.family == Family::V4));
        // The client command runs in the client namespace: it sees the client's address.
        let out = t
            .client_command("ip")
            .unwrap()
            .args(["-o", "addr", "show", "dev", &t.client_if])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&t.client_addr.to_string()), "{text}");
    }
    assert!(v4.cidrs()[0].starts_with("172.") && v4.cidrs()[0].ends_with("/26"));
    assert!(v6.cidrs()[1].starts_with("fd00:cc:") && v6.cidrs()[1].ends_with("/64"));
    assert!(v4.node.is_some() && v4.node_if.is_some() && v6.node.is_none());
    // Two topologies of one process never share addresses.
    let other = topology(Placement::PodClient, Family::V4);
    assert_ne!(other.cidrs(), v4.cidrs());
    assert_ne!(other.vip, v4.vip);
}
