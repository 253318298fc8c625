//! Service-aware breaking behind a virtual IP that nftables DNATs at random to three
//! endpoints, as kube-proxy does, in both places a node NATs: a host-network client's own
//! OUTPUT, and a node's PREROUTING for a pod client. IPv4 and IPv6. The agent runs with
//! its default enforcement (the cgroup hooks) in the namespace that NATs, as a DaemonSet
//! with hostNetwork does.
//!
//! One scenario per topology:
//! 1. an endpoint refuses: clients see at most `failure_threshold` failures, then every
//!    request succeeds (re-routed around it), and getpeername() still shows the VIP;
//! 2. it is black-holed instead: its HALF_OPEN probe times out and it re-opens, while the
//!    others keep serving;
//! 3. it comes back: its probe succeeds, it closes, and the route is lifted;
//! 4. every endpoint fails: once all are OPEN, connects to the VIP fail fast.
//!
//! Resolving the endpoint needs conntrack's layout from the kernel's BTF (see
//! circuit-ebpf's `services`). On a kernel without it (the agent logs "service resolution
//! off"), the scenario checks what the agent does instead: the VIP is judged as one
//! upstream, as before.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use circuit_agent::kernel::{Stats, UpstreamCounts};
use circuit_common::{ConnectOutcome, Stat};
use circuit_tests::{
    ChildProcess, RemoveOnDrop, agent_binary, require_root,
    service::{EndpointMode, Family, Placement, RequestResult, ServiceTopology},
    unique_name,
};
use common::{agent_cli, follow_events, isolated_config, nth_transition, spawn_agent, transition};

const THRESHOLD: u32 = 5;
/// The open duration: 4 s, long enough to check what happens while OPEN, stretched under
/// emulation, where the same requests take several times longer.
fn open() -> Duration {
    Duration::from_secs(4) * circuit_tests::wait_scale()
}
const TIMEOUT: Duration = Duration::from_secs(1);

/// `secs` seconds, stretched under emulation like every wait of the suites.
fn wait(secs: u64) -> Duration {
    Duration::from_secs(secs) * circuit_tests::wait_scale()
}
/// Failures past the threshold a client may see while the agent writes the route (outcome
/// → ring buffer → engine → map: about a millisecond here). The requests are paced (see
/// [`pace`]) as a busy client's are; a loop of back-to-back requests 50 µs apart would
/// outrun any agent.
const LAG: usize = 2;

/// The gap after a request: 5 ms, and 25 ms after a failure (the agent has to act on
/// it, and it shares two CPUs with the other tests' agents), stretched under emulation.
fn pace(result: &RequestResult) -> Duration {
    let gap = if *result == RequestResult::Ok { 5 } else { 25 };
    Duration::from_millis(gap) * circuit_tests::wait_scale()
}

struct Run {
    events: ChildProcess,
    agent: ChildProcess,
    pins: RemoveOnDrop,
    scratch: RemoveOnDrop,
    topo: ServiceTopology,
}

impl Run {
    fn start(placement: Placement, family: Family) -> Run {
        require_root().unwrap();
        let topo = ServiceTopology::new("cbsvc", placement, family, 3).unwrap();
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbpin")));
        let scratch = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbsvc")));
        std::fs::create_dir_all(&scratch.0).unwrap();
        let config = scratch.0.join("circuit.toml");
        // The defaults but for the open duration (short enough to wait for), one witness
        // (the one client here; the witness rules have suites of their own) and the panic
        // guard (off, as in every suite: parallel tests fail at once).
        // Endpoints are relearned from the NAT once a minute by default, which lets a
        // connect reach an isolated endpoint now and then: kept off for the steps to count
        // exactly (the agent's unit tests cover relearning).
        let text = format!(
            "{}\n[services]\nrelearn_after = \"10m\"\n",
            isolated_config(
                &topo.cidrs(),
                &format!(
                    "open_duration = \"{}s\", min_witnesses = 1",
                    open().as_secs()
                ),
            )
        );
        std::fs::write(&config, text).unwrap();
        let socket = scratch.0.join("agent.sock");
        let mut cmd = topo.nat_ns().command(agent_binary().unwrap()).unwrap();
        cmd.arg("attach")
            .arg("--config")
            .arg(&config)
            .arg("--pin-dir")
            .arg(&pins.0)
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-addr", "127.0.0.1:0"]);
        let agent = spawn_agent(cmd);
        let events = follow_events(&socket);
        Run {
            events,
            agent,
            pins,
            scratch,
            topo,
        }
    }

    /// `circuit-agent ARGS -o json` against this agent, parsed.
    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
        let socket = self.scratch.0.join("agent.sock");
        serde_json::from_str(&agent_cli(&self.pins.0, &socket, &args)).unwrap()
    }

    fn resolving(&self) -> bool {
        !self
            .agent
            .lines()
            .iter()
            .any(|l| l.contains("service resolution off"))
    }

    fn requests(&self, n: usize) -> Vec<(RequestResult, Option<SocketAddr>, Duration)> {
        (0..n)
            .map(|_| {
                let o = self.topo.request(TIMEOUT).unwrap();
                std::thread::sleep(pace(&o.result));
                (o.result, o.peer, o.elapsed)
            })
            .collect()
    }
}

fn count(results: &[(RequestResult, Option<SocketAddr>, Duration)], r: &RequestResult) -> usize {
    results.iter().filter(|(x, ..)| x == r).count()
}

fn scenario(placement: Placement, family: Family) {
    let run = Run::start(placement, family);
    let topo = &run.topo;
    let vip = topo.vip;
    let dead = topo.endpoints[0];

    // Healthy: every request succeeds through the NAT, and circuit learns the endpoints
    // (after the first: a fresh IPv6 link may still be resolving its neighbours).
    let ready = Instant::now() + wait(10);
    while run.topo.request(TIMEOUT).unwrap().result != RequestResult::Ok {
        assert!(Instant::now() < ready, "the topology never served");
    }
    let warm = run.requests(30);
    assert_eq!(count(&warm, &RequestResult::Ok), 30, "{warm:?}");

    topo.set_mode(0, EndpointMode::Refusing).unwrap();
    if !run.resolving() {
        // Degraded kernel: outcomes name the VIP, judged as one upstream, as before.
        let results = run.requests(30);
        let refused = count(&results, &RequestResult::Refused) as u64;
        assert!(refused > 0, "{results:?}");
        let counts = UpstreamCounts::open_pinned(&run.pins.0).unwrap();
        let of = |addr| {
            counts
                .get(addr)
                .unwrap()
                .into_iter()
                .find(|(o, _)| *o == ConnectOutcome::Refused)
                .map_or(0, |(_, n)| n)
        };
        assert!(of(vip) >= refused, "the VIP's count has the refusals");
        assert_eq!(of(dead), 0, "no endpoint is resolved");
        assert_eq!(
            Stats::open_pinned(&run.pins.0)
                .unwrap()
                .get(Stat::NatResolved)
                .unwrap(),
            0
        );
        return;
    }

    // 1. One endpoint refuses: at most THRESHOLD failures, then re-routed around it.
    let results = run.requests(60);
    let refused = count(&results, &RequestResult::Refused);
    assert!(
        (1..=THRESHOLD as usize + LAG).contains(&refused),
        "{refused} refused: {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|(r, ..)| matches!(r, RequestResult::Ok | RequestResult::Refused)),
        "{results:?}"
    );
    let event = transition(&run.events, dead, "CLOSED", "OPEN", wait(10));
    assert_eq!(
        event.upstream, dead,
        "the endpoint, not the VIP, is isolated"
    );
    let after = run.requests(40);
    assert_eq!(count(&after, &RequestResult::Ok), 40, "{after:?}");
    assert!(
        after.iter().all(|(_, peer, _)| *peer == Some(vip)),
        "getpeername() shows the VIP after a re-route: {after:?}"
    );
    // inspect VIP lists the endpoints with their states; status groups them; the event
    // names the service.
    assert_eq!(event.service, Some(vip), "{event:?}");
    let inspect = run.cli_json(&["inspect", &vip.to_string()]);
    let endpoints = inspect["service"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3, "{inspect}");
    assert_eq!(inspect["service"]["state"], "degraded", "{inspect}");
    let isolated: Vec<&serde_json::Value> =
        endpoints.iter().filter(|e| e["state"] == "OPEN").collect();
    assert_eq!(isolated.len(), 1, "{inspect}");
    assert_eq!(isolated[0]["endpoint"], dead.to_string());
    let status = run.cli_json(&["status"]);
    assert!(
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["service"] == vip.to_string()),
        "{status}"
    );
    let served = topo.served();
    let before = served[0];

    // 2. Black-holed: its HALF_OPEN probe (one request) times out, and it re-opens.
    topo.set_mode(0, EndpointMode::BlackHoled).unwrap();
    let half_open = Instant::now() + open();
    while Instant::now() < half_open + Duration::from_secs(1) {
        run.requests(5);
    }
    transition(&run.events, dead, "OPEN", "HALF_OPEN", wait(10));
    let results = run.requests(30);
    assert!(
        count(&results, &RequestResult::TimedOut) <= 1,
        "one probe at most: {results:?}"
    );
    nth_transition(&run.events, 1, dead, "HALF_OPEN", "OPEN", wait(15));
    assert_eq!(topo.served()[0], before, "nothing reached the black hole");

    // 3. It comes back: its probe succeeds and it closes; the NAT is in charge again.
    topo.set_mode(0, EndpointMode::Serving).unwrap();
    // Its second open period is twice the first (linear backoff), then it probes.
    let deadline = Instant::now() + 3 * open() + wait(5);
    while Instant::now() < deadline && topo.served()[0] == before {
        let results = run.requests(5);
        assert!(
            count(&results, &RequestResult::Ok) == 5,
            "no client error while it recovers: {results:?}"
        );
    }
    transition(&run.events, dead, "HALF_OPEN", "CLOSED", wait(10));
    let results = run.requests(30);
    assert_eq!(count(&results, &RequestResult::Ok), 30, "{results:?}");
    assert!(topo.served()[0] > before, "the NAT picks it again");

    // 4. Every endpoint fails: each trips, then connects to the VIP fail fast.
    let rejects = || {
        Stats::open_pinned(&run.pins.0)
            .unwrap()
            .get(Stat::ServiceRejects)
            .unwrap()
    };
    for i in 0..3 {
        topo.set_mode(i, EndpointMode::Refusing).unwrap();
    }
    let before = rejects();
    let results = run.requests(60);
    // A reject by circuit is ECONNREFUSED, or EPERM before Linux 5.18.
    let failed = results
        .iter()
        .filter(|(r, ..)| *r != RequestResult::Ok)
        .count() as u64;
    let by_circuit = rejects() - before;
    assert!(
        failed.saturating_sub(by_circuit) <= 3 * (u64::from(THRESHOLD) + LAG as u64),
        "{by_circuit} of {failed} failures by circuit: {results:?}"
    );
    for endpoint in &topo.endpoints {
        transition(&run.events, *endpoint, "CLOSED", "OPEN", wait(10));
    }
    let inspect = run.cli_json(&["inspect", &vip.to_string()]);
    assert_eq!(inspect["service"]["state"], "open", "{inspect}");
    let before = rejects();
    let results = run.requests(10);
    assert!(
        results.iter().all(|(r, ..)| *r != RequestResult::Ok),
        "{results:?}"
    );
    assert_eq!(
        rejects() - before,
        10,
        "failed fast by circuit: {results:?}"
    );
}

#[test]
fn host_client_behind_output_nat_v4() {
    scenario(Placement::HostClient, Family::V4);
}

#[test]
fn host_client_behind_output_nat_v6() {
    scenario(Placement::HostClient, Family::V6);
}

#[test]
fn pod_client_behind_node_prerouting_nat_v4() {
    scenario(Placement::PodClient, Family::V4);
}

#[test]
fn pod_client_behind_node_prerouting_nat_v6() {
    scenario(Placement::PodClient, Family::V6);
}
