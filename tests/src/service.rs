//! A Kubernetes Service in miniature: a virtual IP (VIP) that nftables DNATs, connection
//! by connection and at random, to one of N endpoints, as kube-proxy's nftables mode does
//! (`numgen random mod N vmap { 0 : goto endpoint0, ... }` in a `nat` chain).
//!
//! Two placements of the client, as on a node:
//!
//! - [`Placement::HostClient`]: the client runs in a namespace that DNATs the VIP itself in
//!   nftables OUTPUT (kube-proxy for host-network processes). One veth joins it to the
//!   endpoints' namespace.
//! - [`Placement::PodClient`]: the client runs in a "pod" namespace whose default route goes
//!   through a "node" namespace, which DNATs the VIP in nftables PREROUTING (kube-proxy for
//!   pods) and routes to the endpoints' namespace.
//!
//! Every endpoint is an address in one endpoints namespace, served by a thread that writes
//! "ok\n" to each connection and closes it. [`ServiceTopology::set_mode`] makes an endpoint
//! refuse (its SYNs answered by a RST) or swallow SYNs, by nftables sets in the endpoints'
//! namespace, so a change is instant and atomic.
//!
//! Addresses come from 172.16.0.0/12 and fd00:cc::/32, derived from the pid and a
//! process-wide counter like [`crate::Sandbox`]'s, and never overlap the sandboxes' ranges
//! (10.100–10.199.x.x, fd00:cb::). Each topology has one /24 (four /26: the endpoints'
//! link, the VIP's range, the pod's link) and four /64s. The VIP lies outside the
//! endpoints' subnet, as a ClusterIP does.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    ChildProcess, Client, MAX_IFNAME_LEN, NetNs, NsHandle, lock, unique_name_within, wait_until,
};

/// The Service's port on the VIP.
pub const VIP_PORT: u16 = 80;
/// The endpoints' port (the Service's targetPort).
pub const TARGET_PORT: u16 = 8080;
/// What every endpoint writes to each connection before closing it.
pub const RESPONSE: &[u8] = b"ok\n";
/// Endpoints are hosts 10.. of a /26.
pub const MAX_ENDPOINTS: usize = 50;
/// The ports of [`ConnectionWatch`]'s marker connections on loopback, where nothing listens
/// (one per marker, so that a repeated marker is not taken for the next one).
const MARKER_PORTS: std::ops::Range<u16> = 1..1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The client runs in a namespace that DNATs the VIP itself in nftables OUTPUT
    /// (kube-proxy for host-network clients).
    HostClient,
    /// The client runs in a "pod" namespace whose default route goes through a "node"
    /// namespace that DNATs the VIP in nftables PREROUTING (kube-proxy for pod clients).
    PodClient,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointMode {
    /// Accepts, writes "ok\n", closes.
    Serving,
    /// Its SYNs are answered by a RST (nftables `reject with tcp reset`): the client's
    /// connect fails with ECONNREFUSED.
    Refusing,
    /// Its SYNs are silently dropped: the client's connect times out.
    BlackHoled,
}

/// How one [`ServiceTopology::request`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestResult {
    /// "ok" was read.
    Ok,
    /// The connect failed with ECONNREFUSED (a RST, or a local reject).
    Refused,
    /// The connect or the read did not finish within the timeout.
    TimedOut,
    /// The connection was reset (ECONNRESET) before "ok" was read.
    Reset,
    /// The peer closed the connection before "ok" was read (e.g. a proxy that found no
    /// server).
    Closed,
    /// Any other error, as its message.
    Other(String),
}

/// The outcome of one request and what the client saw of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    pub result: RequestResult,
    /// What getpeername() returned once connected (the VIP, when the DNAT is transparent).
    pub peer: Option<SocketAddr>,
    /// Connect and read, as the client timed them.
    pub elapsed: Duration,
}

/// The three /26s (and their /64 twins) of one topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The link between the endpoints and whoever routes to them (the host client, or the
    /// node): the gateway is host 1, endpoint i is host 10 + i.
    Endpoints = 0,
    /// The VIP's range (a ClusterIP range): the VIP is host 10.
    Vip = 1,
    /// The pod's link to the node (PodClient): the node is host 1, the pod host 2.
    PodLink = 2,
}

const GATEWAY_HOST: u8 = 1;
const POD_HOST: u8 = 2;
const FIRST_ENDPOINT_HOST: u8 = 10;
const VIP_HOST: u8 = 10;

/// One topology's addresses: a /24 of 172.16.0.0/12 and four /64s of fd00:cc::/32, unique
/// among concurrent topologies (the pid picks one of 128 blocks of 32 /24s, a process-wide
/// counter one /24 in the block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// Which /24 of the /12 (0..4096).
    slot: u16,
    /// The third group of the /64s.
    v6_pid: u16,
    /// The fourth group of the /64s, divided by 4.
    v6_index: u16,
}

impl Plan {
    fn next() -> Plan {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        Plan::of(std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
    }

    fn of(pid: u32, n: u32) -> Plan {
        Plan {
            slot: ((pid % 128) * 32 + n % 32) as u16,
            v6_pid: (pid % 0x1_0000) as u16,
            v6_index: (n % 0x4000) as u16,
        }
    }

    fn v4(&self, part: Part, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(
            172,
            16 + (self.slot >> 8) as u8,
            (self.slot & 0xff) as u8,
            part as u8 * 64 + host,
        )
    }

    fn v6(&self, part: Part, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0xcc,
            self.v6_pid,
            self.v6_index * 4 + part as u16,
            0,
            0,
            0,
            host.into(),
        )
    }

    fn addr(&self, family: Family, part: Part, host: u8) -> IpAddr {
        match family {
            Family::V4 => self.v4(part, host).into(),
            Family::V6 => self.v6(part, host).into(),
        }
    }

    /// `host`'s address with the prefix length of its part, e.g. "172.16.3.1/26".
    fn with_len(&self, family: Family, part: Part, host: u8) -> String {
        match family {
            Family::V4 => format!("{}/26", self.v4(part, host)),
            Family::V6 => format!("{}/64", self.v6(part, host)),
        }
    }

    /// The part's network, e.g. "172.16.3.64/26".
    fn cidr(&self, family: Family, part: Part) -> String {
        self.with_len(family, part, 0)
    }
}

/// A Service VIP DNATed at random to N endpoints; see the module documentation. Everything
/// it made goes away on drop: the servers stop, the namespaces (with their interfaces and
/// nftables tables) are deleted.
pub struct ServiceTopology {
    // Fields drop in declaration order: the client thread and the servers first, then the
    // namespaces.
    requester: Client,
    servers: Vec<Server>,
    modes: Mutex<Vec<EndpointMode>>,
    pub placement: Placement,
    pub family: Family,
    /// The Service's address (port [`VIP_PORT`]).
    pub vip: SocketAddr,
    /// The endpoints' addresses (port [`TARGET_PORT`]), in the DNAT's order.
    pub endpoints: Vec<SocketAddr>,
    /// The client's own address (the pod's, or the host client's on the endpoints' link).
    pub client_addr: IpAddr,
    /// The client's interface, in `client`.
    pub client_if: String,
    /// PodClient: the host side of the pod's veth, in `node` (where an agent on the node
    /// attaches XDP for the pod's SYNs).
    pub node_if: Option<String>,
    /// The interface towards the endpoints in the namespace that DNATs (`client` for
    /// HostClient, `node` for PodClient).
    pub gateway_if: String,
    /// The endpoints' interface, in `endpoints_ns`.
    pub endpoints_if: String,
    /// The nftables table of the DNAT (family `ip` or `ip6`), in [`Self::nat_ns`].
    pub nat_table: String,
    /// The nftables table (family `inet`) of the endpoint modes, in `endpoints_ns`.
    pub filter_table: String,
    plan: Plan,
    /// Where the client process runs.
    pub client: NetNs,
    /// PodClient: the node's namespace (routes, DNATs in PREROUTING).
    pub node: Option<NetNs>,
    pub endpoints_ns: NetNs,
}

impl ServiceTopology {
    /// Builds the topology with `endpoints` endpoints (1 to [`MAX_ENDPOINTS`]), all serving;
    /// namespace and interface names start with `prefix` (keep it short, and starting with
    /// [`crate::NAME_PREFIX`] so leak checks see them).
    pub fn new(
        prefix: &str,
        placement: Placement,
        family: Family,
        endpoints: usize,
    ) -> Result<Self> {
        ensure!(
            (1..=MAX_ENDPOINTS).contains(&endpoints),
            "a service of 1 to {MAX_ENDPOINTS} endpoints, not {endpoints}"
        );
        // One byte is left for the role suffix.
        let base = unique_name_within(prefix, MAX_IFNAME_LEN - 1);
        let plan = Plan::next();
        let name = |role: char| format!("{base}{role}");
        let endpoints_if = name('e');
        let endpoints_ns = create_ns(&endpoints_if)?;

        let (client, node, client_if, node_if, gateway_if) = match placement {
            Placement::HostClient => {
                let client = create_ns(&name('c'))?;
                (client, None, name('c'), None, name('c'))
            }
            Placement::PodClient => {
                let node = create_ns(&name('n'))?;
                node.run(|| {
                    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                })?
                .context("enabling forwarding in the node namespace")?;
                let pod = create_ns(&name('p'))?;
                veth(&pod, &name('p'), &node, &name('h'))?;
                for (ns, ifname, host) in [(&pod, name('p'), POD_HOST), (&node, name('h'), 1)] {
                    address(ns, &ifname, &plan, Part::PodLink, host)?;
                }
                for f in [Family::V4, Family::V6] {
                    route(
                        &pod,
                        f,
                        "default",
                        Some(plan.addr(f, Part::PodLink, GATEWAY_HOST)),
                        &name('p'),
                    )?;
                }
                (pod, Some(node), name('p'), Some(name('h')), name('n'))
            }
        };
        let gateway_ns = node.as_ref().unwrap_or(&client);
        veth(gateway_ns, &gateway_if, &endpoints_ns, &endpoints_if)?;
        address(
            gateway_ns,
            &gateway_if,
            &plan,
            Part::Endpoints,
            GATEWAY_HOST,
        )?;
        let hosts = (0..endpoints).map(|i| FIRST_ENDPOINT_HOST + i as u8);
        for host in hosts.clone() {
            address(&endpoints_ns, &endpoints_if, &plan, Part::Endpoints, host)?;
        }
        for f in [Family::V4, Family::V6] {
            match placement {
                // The VIP is reached through the endpoints' link: the route only has to
                // exist for the first lookup, OUTPUT's DNAT re-routes to the endpoint.
                Placement::HostClient => {
                    route(&client, f, &plan.cidr(f, Part::Vip), None, &client_if)?
                }
                // The endpoints answer pods through the node.
                Placement::PodClient => route(
                    &endpoints_ns,
                    f,
                    "default",
                    Some(plan.addr(f, Part::Endpoints, GATEWAY_HOST)),
                    &endpoints_if,
                )?,
            }
        }

        let vip = SocketAddr::new(plan.addr(family, Part::Vip, VIP_HOST), VIP_PORT);
        let endpoint_addrs: Vec<SocketAddr> = hosts
            .map(|host| SocketAddr::new(plan.addr(family, Part::Endpoints, host), TARGET_PORT))
            .collect();
        let client_addr = match placement {
            Placement::HostClient => plan.addr(family, Part::Endpoints, GATEWAY_HOST),
            Placement::PodClient => plan.addr(family, Part::PodLink, POD_HOST),
        };

        let nat_table = format!("{base}_nat");
        let hook = match placement {
            Placement::HostClient => "output",
            Placement::PodClient => "prerouting",
        };
        nft(
            gateway_ns,
            &nat_script(&nat_table, family, hook, vip, &endpoint_addrs),
        )?;
        let filter_table = format!("{base}_modes");
        nft(&endpoints_ns, &filter_script(&filter_table, family))?;

        let servers = endpoint_addrs
            .iter()
            .map(|addr| Server::start(&endpoints_ns, *addr))
            .collect::<Result<Vec<_>>>()?;
        let requester = Client::new(&client)?;
        Ok(ServiceTopology {
            requester,
            servers,
            modes: Mutex::new(vec![EndpointMode::Serving; endpoints]),
            placement,
            family,
            vip,
            endpoints: endpoint_addrs,
            client_addr,
            client_if,
            node_if,
            gateway_if,
            endpoints_if,
            nat_table,
            filter_table,
            plan,
            client,
            node,
            endpoints_ns,
        })
    }

    /// The namespace whose nftables DNATs the VIP: the client's (HostClient) or the node's
    /// (PodClient). Its conntrack table holds the translations.
    pub fn nat_ns(&self) -> &NetNs {
        self.node.as_ref().unwrap_or(&self.client)
    }

    /// The CIDRs this topology uses for its family (the endpoints' subnet and the VIP's
    /// range), for the agent's configuration ("only these may be isolated").
    pub fn cidrs(&self) -> Vec<String> {
        vec![
            self.plan.cidr(self.family, Part::Endpoints),
            self.plan.cidr(self.family, Part::Vip),
        ]
    }

    /// Sets one endpoint's mode; see [`Self::set_modes`].
    pub fn set_mode(&self, endpoint: usize, mode: EndpointMode) -> Result<()> {
        let mut modes = lock(&self.modes).clone();
        ensure!(
            endpoint < modes.len(),
            "endpoint {endpoint} of {}",
            modes.len()
        );
        modes[endpoint] = mode;
        self.set_modes(&modes)
    }

    /// Sets every endpoint's mode at once, in one nftables transaction: a SYN sees either
    /// the old modes or the new ones.
    pub fn set_modes(&self, modes: &[EndpointMode]) -> Result<()> {
        let mut current = lock(&self.modes);
        ensure!(
            modes.len() == current.len(),
            "{} modes for {} endpoints",
            modes.len(),
            current.len()
        );
        let table = &self.filter_table;
        let mut script = String::new();
        for (set, mode) in [
            ("refusing", EndpointMode::Refusing),
            ("blackholed", EndpointMode::BlackHoled),
        ] {
            script += &format!("flush set inet {table} {set}\n");
            let members: Vec<String> = self
                .endpoints
                .iter()
                .zip(modes)
                .filter(|(_, m)| **m == mode)
                .map(|(addr, _)| addr.ip().to_string())
                .collect();
            if !members.is_empty() {
                script += &format!(
                    "add element inet {table} {set} {{ {} }}\n",
                    members.join(", ")
                );
            }
        }
        nft(&self.endpoints_ns, &script)?;
        current.copy_from_slice(modes);
        Ok(())
    }

    /// Every endpoint's mode.
    pub fn modes(&self) -> Vec<EndpointMode> {
        lock(&self.modes).clone()
    }

    /// One request to the VIP from the client namespace: connect, then read until "ok",
    /// EOF or an error; `timeout` covers the connect and the read together.
    pub fn request(&self, timeout: Duration) -> Result<RequestOutcome> {
        self.request_to(self.vip, timeout)
    }

    /// Like [`Self::request`], to another address (e.g. a proxy in the client namespace).
    pub fn request_to(&self, to: SocketAddr, timeout: Duration) -> Result<RequestOutcome> {
        self.requester.run_job(move || request(to, timeout))
    }

    /// A command that runs in the client namespace.
    pub fn client_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        self.client.command(program)
    }

    /// Connections each endpoint's server accepted so far (0 once the servers are stopped).
    pub fn served(&self) -> Vec<u64> {
        let mut served: Vec<u64> = self.servers.iter().map(Server::served).collect();
        served.resize(self.endpoints.len(), 0);
        served
    }

    /// Stops the endpoints' "ok" servers, e.g. to put another server (nginx) on the same
    /// addresses and port. The modes stay in force.
    pub fn stop_servers(&mut self) {
        self.servers.clear();
    }

    /// Starts watching which endpoint each new connection through the DNAT goes to
    /// (conntrack's NEW events in [`Self::nat_ns`]).
    pub fn watch_connections(&self) -> Result<ConnectionWatch> {
        ConnectionWatch::start(self)
    }

    /// Empties the conntrack table of [`Self::nat_ns`], translations included: for use
    /// between runs, with no connection open (an open one loses its translation). A new
    /// connect that happens to reuse the tuple of an earlier one still in the table (a
    /// black-holed connect's SYN_SENT entry lives 120 s) would otherwise follow the old
    /// translation to the old endpoint, without a NEW event.
    pub fn flush_conntrack(&self) -> Result<()> {
        let out = self
            .nat_ns()
            .command("conntrack")?
            .arg("-F")
            .stdin(Stdio::null())
            .output()
            .context("running conntrack (apt-get install conntrack)")?;
        ensure!(
            out.status.success(),
            "conntrack -F in netns {} failed: {}",
            self.nat_ns().name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

/// A namespace whose interfaces skip IPv6 duplicate address detection, link-local
/// addresses included: while the link-local address of an interface is tentative, the first
/// connections through a router (the node) lose their SYNs for about two seconds.
fn create_ns(name: &str) -> Result<NetNs> {
    let ns = NetNs::create(name)?;
    ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0"))?
        .with_context(|| format!("turning DAD off in netns {name}"))?;
    Ok(ns)
}

/// Creates a veth pair with one end in each namespace (never in the host's).
fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
}

/// Adds `host`'s IPv4 and IPv6 addresses of `part` to `ifname` and sets it up.
fn address(ns: &NetNs, ifname: &str, plan: &Plan, part: Part, host: u8) -> Result<()> {
    ns.ip(&[
        "addr",
        "add",
        &plan.with_len(Family::V4, part, host),
        "dev",
        ifname,
    ])?;
    // nodad: usable at once, instead of after duplicate address detection.
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &plan.with_len(Family::V6, part, host),
        "dev",
        ifname,
        "nodad",
    ])?;
    ns.ip(&["link", "set", ifname, "up"])
}

fn route(ns: &NetNs, family: Family, to: &str, via: Option<IpAddr>, dev: &str) -> Result<()> {
    let f = match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    };
    let via = via.map(|v| v.to_string());
    let mut args = vec![f, "route", "add", to];
    if let Some(via) = &via {
        args.extend(["via", via]);
    }
    args.extend(["dev", dev]);
    ns.ip(&args)
}

/// The DNAT of kube-proxy's nftables mode, reduced to one Service: a `services` verdict
/// map on (VIP, protocol, port), a service chain that picks an endpoint with `numgen
/// random`, one chain per endpoint that DNATs to it, all from a base chain in `hook`.
fn nat_script(
    table: &str,
    family: Family,
    hook: &str,
    vip: SocketAddr,
    endpoints: &[SocketAddr],
) -> String {
    let (fam, daddr) = match family {
        Family::V4 => ("ip", "ip daddr"),
        Family::V6 => ("ip6", "ip6 daddr"),
    };
    let mut s = format!("add table {fam} {table}\n");
    for (i, endpoint) in endpoints.iter().enumerate() {
        s += &format!(
            "add chain {fam} {table} endpoint{i}\n\
             add rule {fam} {table} endpoint{i} meta l4proto tcp dnat to {endpoint}\n"
        );
    }
    let arms: Vec<String> = (0..endpoints.len())
        .map(|i| format!("{i} : goto endpoint{i}"))
        .collect();
    s += &format!(
        "add chain {fam} {table} service\n\
         add rule {fam} {table} service numgen random mod {} vmap {{ {} }}\n\
         add chain {fam} {table} services\n\
         add rule {fam} {table} services {daddr} . meta l4proto . th dport vmap {{ {} . tcp . {} : goto service }}\n\
         add chain {fam} {table} {hook} {{ type nat hook {hook} priority -100; policy accept; }}\n\
         add rule {fam} {table} {hook} jump services\n",
        endpoints.len(),
        arms.join(", "),
        vip.ip(),
        vip.port(),
    );
    s
}

/// The endpoints' modes: SYNs (and any segment) to an address in `refusing` are answered by
/// a RST, to one in `blackholed` dropped; only on the target port.
fn filter_script(table: &str, family: Family) -> String {
    let (kind, daddr) = match family {
        Family::V4 => ("ipv4_addr", "ip daddr"),
        Family::V6 => ("ipv6_addr", "ip6 daddr"),
    };
    format!(
        "add table inet {table}\n\
         add set inet {table} refusing {{ type {kind}; }}\n\
         add set inet {table} blackholed {{ type {kind}; }}\n\
         add chain inet {table} input {{ type filter hook input priority -10; policy accept; }}\n\
         add rule inet {table} input {daddr} @refusing tcp dport {TARGET_PORT} reject with tcp reset\n\
         add rule inet {table} input {daddr} @blackholed tcp dport {TARGET_PORT} drop\n"
    )
}

/// Runs the nftables `script` (one transaction) inside `ns`.
fn nft(ns: &NetNs, script: &str) -> Result<()> {
    let mut child = ns
        .command("nft")?
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed? `cargo xtask setup` installs it)")?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let out = child.wait_with_output()?;
    written.context("writing to nft")?;
    if !out.status.success() {
        bail!(
            "nft in netns {} failed ({}): {}\nscript:\n{script}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One request: connect, read until "ok" and then EOF, within `timeout` in all.
fn request(to: SocketAddr, timeout: Duration) -> RequestOutcome {
    let start = Instant::now();
    let mut peer = None;
    let result = exchange(to, timeout, start + timeout, &mut peer);
    RequestOutcome {
        result,
        peer,
        elapsed: start.elapsed(),
    }
}

fn exchange(
    to: SocketAddr,
    timeout: Duration,
    deadline: Instant,
    peer: &mut Option<SocketAddr>,
) -> RequestResult {
    let mut stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(stream) => stream,
        Err(err) => return classify(&err),
    };
    *peer = stream.peer_addr().ok();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let answered = |got: &[u8]| got.windows(2).any(|w| w == b"ok");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // After "ok" the read goes on until the server's close, so the client closes
        // second and the TIME_WAIT stays with the server.
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return if answered(&got) {
                RequestResult::Ok
            } else {
                RequestResult::TimedOut
            };
        }
        match stream.read(&mut buf) {
            Ok(0) if answered(&got) => return RequestResult::Ok,
            Ok(0) => return RequestResult::Closed,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if answered(&got) => return RequestResult::Ok,
            Err(err) => return classify(&err),
        }
    }
}

fn classify(err: &io::Error) -> RequestResult {
    match (err.raw_os_error(), err.kind()) {
        (Some(libc::ECONNREFUSED), _) => RequestResult::Refused,
        (Some(libc::ECONNRESET), _) => RequestResult::Reset,
        (_, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => RequestResult::TimedOut,
        _ => RequestResult::Other(err.to_string()),
    }
}

/// An endpoint's server: a thread blocked in accept() that writes [`RESPONSE`] to each
/// connection and closes it. Dropping it shuts the listener down, which wakes the accept.
struct Server {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs, addr: SocketAddr) -> Result<Server> {
        let listener = ns
            .run(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in netns {}", ns.name()))?;
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name(format!("endpoint {addr}"))
            .spawn({
                let (listener, stopping, served) = (
                    Arc::clone(&listener),
                    Arc::clone(&stopping),
                    Arc::clone(&served),
                );
                move || serve(&listener, &stopping, &served, addr)
            })?;
        Ok(Server {
            listener,
            stopping,
            served,
            thread: Some(thread),
        })
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

fn serve(listener: &TcpListener, stopping: &AtomicBool, served: &AtomicU64, addr: SocketAddr) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                served.fetch_add(1, Ordering::Relaxed);
                // A few bytes into a fresh socket's buffer never block; a client that
                // has gone already is no error of the server's.
                let _ = stream.write_all(RESPONSE);
            }
            Err(_) if stopping.load(Ordering::Relaxed) => return,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(err) => {
                // E.g. out of descriptors: back off instead of spinning.
                eprintln!("endpoint {addr}: accept failed: {err}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Shutting a listening socket down wakes the thread's accept() with EINVAL (and
        // closes the socket itself, not only this descriptor: a copy a forked child
        // inherited would otherwise keep it listening).
        // SAFETY: the descriptor is valid while `listener` lives; shutdown changes state only.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: endpoint server thread panicked");
        }
    }
}

/// Which endpoint each new TCP connection in the DNAT's namespace went to, from
/// `conntrack -E -e NEW` (a connection counts once, however many SYNs it sent; one that
/// never left the client, e.g. rejected at connect(), not at all; one that reused the tuple
/// of an entry still in the table neither, see [`ServiceTopology::flush_conntrack`]).
/// Stopped on drop.
pub struct ConnectionWatch {
    process: ChildProcess,
    ns: NsHandle,
    endpoints: Vec<SocketAddr>,
    loopback: IpAddr,
    markers: usize,
}

/// How long to wait for conntrack's events.
const WATCH_WAIT: Duration = Duration::from_secs(10);

impl ConnectionWatch {
    fn start(topology: &ServiceTopology) -> Result<ConnectionWatch> {
        let ns = topology.nat_ns();
        let mut cmd = ns.command("conntrack")?;
        // A large socket buffer: a burst of refused connects (tens of thousands a second)
        // must not overflow it while conntrack waits for a CPU.
        cmd.args(["-E", "-e", "NEW", "-p", "tcp", "--buffer-size", "16777216"]);
        let mut watch = ConnectionWatch {
            process: ChildProcess::spawn_silent("conntrack", cmd)?,
            ns: ns.ns.try_clone()?,
            endpoints: topology.endpoints.clone(),
            loopback: match topology.family {
                Family::V4 => Ipv4Addr::LOCALHOST.into(),
                Family::V6 => Ipv6Addr::LOCALHOST.into(),
            },
            markers: 0,
        };
        // Subscribed once the first marker's event arrives.
        watch.sync()?;
        Ok(watch)
    }

    /// Makes a marker connection (refused, on loopback, to a port of its own) and waits for
    /// its event: every connection made before it has been reported by then.
    fn sync(&mut self) -> Result<()> {
        self.markers += 1;
        // Loopback of the topology's family: the DNAT's table enables conntrack for that
        // family only.
        let port = MARKER_PORTS.start + (self.markers % MARKER_PORTS.len()) as u16;
        let marker = SocketAddr::new(self.loopback, port);
        let needle = format!("dst={} sport=", marker.ip());
        let port_field = format!(" dport={port} ");
        wait_until(
            "conntrack to report a marker connection",
            WATCH_WAIT,
            Duration::from_millis(50),
            || {
                let seen = |l: &String| l.contains(&needle) && l.contains(&port_field);
                if self.process.lines().iter().any(seen) {
                    return Some(());
                }
                // The first connect may come before conntrack subscribed: repeat it until
                // it is seen (repeats of this marker are told apart from later ones).
                if let Err(err) = self.ns.run(move || TcpStream::connect(marker)) {
                    eprintln!("warning: marker connection: {err:#}");
                }
                None
            },
        )
    }

    /// New connections to each endpoint (in the topology's order) since the watch started.
    /// Fails if conntrack reported losing events.
    pub fn per_endpoint(&mut self) -> Result<Vec<u64>> {
        self.sync()?;
        let lines = self.process.lines();
        if let Some(lost) = lines.iter().find(|l| l.contains("ENOBUFS")) {
            bail!("conntrack lost events: {lost}");
        }
        let mut counts = vec![0; self.endpoints.len()];
        for line in lines {
            if let Some(to) = reply_source(&line)
                && let Some(i) = self.endpoints.iter().position(|e| *e == to)
            {
                counts[i] += 1;
            }
        }
        Ok(counts)
    }
}

/// The reply direction's source of a conntrack event line (the endpoint a DNATed
/// connection went to; the destination itself when nothing translated it).
fn reply_source(line: &str) -> Option<SocketAddr> {
    let value = |key: &str| {
        line.split_whitespace()
            .filter_map(move |field| field.strip_prefix(key))
            .nth(1)
    };
    let ip: IpAddr = value("src=")?.parse().ok()?;
    let port: u16 = value("sport=")?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn plans_stay_in_their_ranges_and_apart() {
        let mut slots = HashSet::new();
        for n in 0..32 {
            let plan = Plan::of(4_194_303, n);
            assert!(slots.insert(plan.slot));
            for part in [Part::Endpoints, Part::Vip, Part::PodLink] {
                let v4 = plan.v4(part, 62);
                assert_eq!(v4.octets()[0], 172);
                assert!((16..32).contains(&v4.octets()[1]), "{v4}");
                assert_eq!(plan.v6(part, 1).segments()[..2], [0xfd00, 0xcc]);
            }
        }
        assert_eq!(
            Plan::of(0, 0).v4(Part::Endpoints, 1),
            Ipv4Addr::new(172, 16, 0, 1)
        );
        assert_eq!(
            Plan::of(127, 31).v4(Part::PodLink, 2),
            Ipv4Addr::new(172, 31, 255, 130)
        );
        assert_eq!(
            Plan::of(0x1_0005, 3).v6(Part::Vip, 10),
            "fd00:cc:5:d::a".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn the_vip_is_outside_the_endpoints_subnet() {
        let plan = Plan::of(42, 7);
        assert_eq!(plan.cidr(Family::V4, Part::Endpoints), "172.21.71.0/26");
        assert_eq!(plan.cidr(Family::V4, Part::Vip), "172.21.71.64/26");
        assert_eq!(plan.v4(Part::Vip, VIP_HOST), Ipv4Addr::new(172, 21, 71, 74));
        assert_eq!(
            plan.v4(
                Part::Endpoints,
                FIRST_ENDPOINT_HOST + MAX_ENDPOINTS as u8 - 1
            ),
            Ipv4Addr::new(172, 21, 71, 59)
        );
        assert_eq!(plan.cidr(Family::V6, Part::Vip), "fd00:cc:2a:1d::/64");
    }

    #[test]
    fn conntrack_lines_name_the_endpoint() {
        let line = "    [NEW] tcp      6 120 SYN_SENT src=172.16.0.1 dst=172.16.0.74 sport=47260 \
                    dport=80 [UNREPLIED] src=172.16.0.11 dst=172.16.0.1 sport=8080 dport=47260";
        assert_eq!(
            reply_source(line),
            Some("172.16.0.11:8080".parse().unwrap())
        );
        let line6 = "[NEW] tcp 6 120 SYN_SENT src=fd00:cc:1:4::1 dst=fd00:cc:1:5::a sport=1 \
                     dport=80 [UNREPLIED] src=fd00:cc:1:4::b dst=fd00:cc:1:4::1 sport=8080 dport=1";
        assert_eq!(
            reply_source(line6),
            Some("[fd00:cc:1:4::b]:8080".parse().unwrap())
        );
        assert_eq!(reply_source("conntrack v1.4.7: 3 flow events"), None);
    }

    #[test]
    fn the_dnat_is_kube_proxys_numgen_vmap() {
        let vip: SocketAddr = "172.16.0.74:80".parse().unwrap();
        let eps: Vec<SocketAddr> = vec![
            "172.16.0.10:8080".parse().unwrap(),
            "172.16.0.11:8080".parse().unwrap(),
        ];
        let script = nat_script("t", Family::V4, "output", vip, &eps);
        assert!(
            script.contains("numgen random mod 2 vmap { 0 : goto endpoint0, 1 : goto endpoint1 }")
        );
        assert!(script.contains("dnat to 172.16.0.11:8080"));
        assert!(script.contains("type nat hook output"));
        let script6 = nat_script(
            "t",
            Family::V6,
            "prerouting",
            "[fd00:cc::a]:80".parse().unwrap(),
            &["[fd00:cc::10]:8080".parse().unwrap()],
        );
        assert!(script6.contains("add table ip6 t"));
        assert!(script6.contains("dnat to [fd00:cc::10]:8080"));
        assert!(
            script6.contains("ip6 daddr . meta l4proto . th dport vmap { fd00:cc::a . tcp . 80")
        );
    }
}
