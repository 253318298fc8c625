//! Network-namespace sandbox for circuit's kernel and end-to-end tests and `cargo xtask demo`.
//!
//! Everything here builds disposable topologies: uniquely named namespaces joined by a veth
//! pair, a TCP upstream that can be flipped between accepting and refusing, a client that
//! connects from inside a namespace, and child processes (the agent) that are stopped and
//! reaped on drop. All traffic stays inside the namespaces created here.

pub mod frames;
pub mod service;

/// toolchain.env's `KEY=VALUE` pairs (comments and blank lines skipped): the versions of the
/// kernel programs' toolchain, which `cargo xtask setup` installs and the Dockerfile
/// sources, and the deployment tests check.
pub fn toolchain_env(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
}

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// Every namespace the tests and the demo make is named with this prefix, so a leak check
/// can tell them from anything else on the machine.
pub const NAME_PREFIX: &str = "cb";
/// Interface names are limited to IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;
/// How often [`ChildProcess`] waits re-check the child's output and state.
const CHILD_POLL: Duration = Duration::from_millis(20);
/// How long a dropped [`ChildProcess`] gets to exit after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How many trailing output lines error messages about a [`ChildProcess`] include.
const TAIL_LINES: usize = 30;
/// How often the [`Upstream`] accept loop polls its non-blocking listener (and its stop flag).
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Fails unless running as root: the tests load eBPF programs and create namespaces.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "this test needs root (CAP_SYS_ADMIN/CAP_BPF/CAP_NET_ADMIN): run as root, e.g. via `cargo xtask test`"
        );
    }
    Ok(())
}

/// A short name unique within this process (and, in practice, across concurrent processes):
/// `prefix` + 4 base-36 digits of the pid + 3 base-36 digits of a process-wide counter, e.g.
/// `unique_name("cbc")` -> `"cbc2n9k004"`. The prefix is shortened as needed so the result
/// fits in an interface name (15 bytes).
pub fn unique_name(prefix: &str) -> String {
    unique_name_within(prefix, MAX_IFNAME_LEN)
}

/// [`unique_name`] limited to `max_len` bytes, so callers can append a role suffix.
fn unique_name_within(prefix: &str, max_len: usize) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Both fields are fixed-width, so distinct counter values give distinct names whatever
    // the prefix.
    let suffix = format!("{}{}", base36(std::process::id(), 4), base36(n, 3));
    let keep = prefix.floor_char_boundary(max_len.saturating_sub(suffix.len()));
    format!("{}{suffix}", &prefix[..keep])
}

/// The low `width` base-36 digits of `n`, zero-padded.
fn base36(mut n: u32, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// Runs `ip <args>`, turning a failure into an error that carries ip's stderr.
fn run_ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Moves the calling thread into the network namespace `ns` refers to. Network namespaces
/// are per thread, so the rest of the process stays where it was.
fn enter_netns(ns: &File) -> nix::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET)
}

/// An open handle on a named network namespace. Holding the fd keeps the namespace usable
/// without re-resolving its name; the name is kept for error messages.
struct NsHandle {
    name: String,
    fd: File,
}

impl NsHandle {
    fn open(name: &str, path: &Path) -> Result<Self> {
        let fd = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            name: name.to_owned(),
            fd,
        })
    }

    fn try_clone(&self) -> Result<Self> {
        let fd = self
            .fd
            .try_clone()
            .with_context(|| format!("duplicating the handle on netns {}", self.name))?;
        Ok(Self {
            name: self.name.clone(),
            fd,
        })
    }

    fn enter(&self) -> Result<()> {
        enter_netns(&self.fd).with_context(|| format!("entering netns {}", self.name))
    }

    /// Runs `f` on a fresh thread inside the namespace, so the caller's thread never moves.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        thread::scope(|scope| {
            let worker = scope.spawn(|| self.enter().map(|()| f()));
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// A named network namespace (`ip netns add`), deleted again on drop. `lo` is up inside.
pub struct NetNs {
    ns: NsHandle,
}

impl NetNs {
    /// Creates the namespace `name`; fails if it already exists (it is never adopted, so a
    /// namespace this value didn't create is never deleted by it).
    pub fn create(name: &str) -> Result<NetNs> {
        run_ip(&["netns", "add", name])?;
        let ns = match NsHandle::open(name, &netns_path(name)) {
            Ok(ns) => NetNs { ns },
            Err(err) => {
                delete_netns(name);
                return Err(err);
            }
        };
        // From here on, dropping `ns` deletes the namespace if setting it up fails.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.ns.name
    }

    /// The namespace's bind mount, e.g. for tools that take a netns path.
    pub fn path(&self) -> PathBuf {
        netns_path(self.name())
    }

    /// Runs `ip -n NAME <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Runs `f` on a fresh thread that has joined this namespace and returns its result
    /// (re-raising its panic, if any). Sockets created there stay in this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.ns.run(f)
    }

    /// A command whose child joins this namespace before exec. This deliberately avoids
    /// `ip netns exec`, which also remounts /sys and so hides the host's bpffs/tracefs view.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let ns = self.ns.try_clone()?;
        let mut cmd = Command::new(program);
        // SAFETY: the hook runs between fork and exec, where only async-signal-safe work is
        // allowed: it makes one setns(2) call and builds an io::Error from a raw errno,
        // neither of which allocates or takes locks.
        unsafe {
            cmd.pre_exec(move || enter_netns(&ns.fd).map_err(io::Error::from));
        }
        Ok(cmd)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        delete_netns(self.name());
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Deletes a namespace during cleanup, where failing loudly must not turn into a panic.
fn delete_netns(name: &str) {
    if let Err(err) = run_ip(&["netns", "del", name]) {
        eprintln!("warning: failed to delete netns {name}: {err:#}");
    }
}

/// A /24 private to one [`Sandbox`]. Agents that watch tracepoints see connections from
/// every namespace on the node, so concurrent sandboxes (even in different test processes)
/// must not share addresses: the second octet is derived from the pid, the third from a
/// process-wide counter.
struct Subnet {
    x: u8,
    y: u8,
}

impl Subnet {
    fn next() -> Subnet {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Subnet {
            x: 100 + (std::process::id() % 100) as u8,
            y: (n % 250 + 1) as u8,
        }
    }

    fn host(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.x, self.y, host)
    }

    /// The IPv6 twin of the subnet: fd00:cb:X:Y::host/64 (unique local addresses).
    fn host6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0xcb,
            self.x.into(),
            self.y.into(),
            0,
            0,
            0,
            host.into(),
        )
    }
}

const BLACK_HOLE_HOST: u8 = 66;
const ABSENT_HOST: u8 = 99;

/// Two namespaces joined by one veth pair, both ends up and addressed from a fresh /24 and
/// its IPv6 twin /64 (client ::1 and .1, upstream ::2 and .2). Each interface is named after
/// the namespace it lives in. No other host answers in the subnet: [`Sandbox::absent_addr`]
/// is unreachable, [`Sandbox::black_hole_addr`] swallows SYNs.
pub struct Sandbox {
    // Fields drop in declaration order: deleting the namespaces destroys the veth pair.
    pub client: NetNs,
    pub upstream: NetNs,
    pub client_if: String,
    pub upstream_if: String,
    pub client_addr: Ipv4Addr,
    pub upstream_addr: Ipv4Addr,
    pub client_addr6: Ipv6Addr,
    pub upstream_addr6: Ipv6Addr,
    subnet: Subnet,
}

impl Sandbox {
    /// Builds a sandbox whose namespace and interface names start with `prefix`.
    pub fn new(prefix: &str) -> Result<Sandbox> {
        // One byte is left for the role suffix, which keeps interface names within 15 bytes.
        let base = unique_name_within(prefix, MAX_IFNAME_LEN - 1);
        let client_if = format!("{base}c");
        let upstream_if = format!("{base}u");
        let client = NetNs::create(&client_if)?;
        let upstream = NetNs::create(&upstream_if)?;
        let subnet = Subnet::next();
        let (client_addr, upstream_addr) = (subnet.host(1), subnet.host(2));
        let (client_addr6, upstream_addr6) = (subnet.host6(1), subnet.host6(2));

        // The veth is created in the client namespace with its peer placed straight into the
        // upstream one, so neither end ever appears in the host namespace.
        client.ip(&[
            "link",
            "add",
            &client_if,
            "type",
            "veth",
            "peer",
            "name",
            &upstream_if,
            "netns",
            upstream.name(),
        ])?;
        for (ns, ifname, addr, addr6) in [
            (&client, &client_if, client_addr, client_addr6),
            (&upstream, &upstream_if, upstream_addr, upstream_addr6),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
            // nodad: usable at once, instead of after duplicate address detection.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                ifname,
                "nodad",
            ])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        // A neighbour that never answers: frames to it leave the client but nobody takes
        // them (the upstream side drops frames for another MAC), a black hole for SYNs.
        client.ip(&[
            "neigh",
            "add",
            &subnet.host(BLACK_HOLE_HOST).to_string(),
            "lladdr",
            "02:00:00:00:0b:0b",
            "dev",
            &client_if,
            "nud",
            "permanent",
        ])?;
        // Address resolution gives up fast, so the unreachable address fails in ~100 ms.
        let neigh = format!("/proc/sys/net/ipv4/neigh/{client_if}");
        client.run(move || -> Result<()> {
            std::fs::write(format!("{neigh}/mcast_solicit"), "1")?;
            std::fs::write(format!("{neigh}/ucast_solicit"), "0")?;
            std::fs::write(format!("{neigh}/retrans_time_ms"), "100")?;
            Ok(())
        })??;

        Ok(Sandbox {
            client,
            upstream,
            client_if,
            upstream_if,
            client_addr,
            upstream_addr,
            client_addr6,
            upstream_addr6,
            subnet,
        })
    }

    /// An address in the subnet nobody has: connecting to it fails with EHOSTUNREACH.
    pub fn absent_addr(&self) -> Ipv4Addr {
        self.subnet.host(ABSENT_HOST)
    }

    /// An address whose frames go nowhere: a connect to it times out.
    pub fn black_hole_addr(&self) -> Ipv4Addr {
        self.subnet.host(BLACK_HOLE_HOST)
    }
}

/// A Kubernetes node in miniature: a "node" namespace that holds the host side of each
/// pod's veth and routes between them, and one namespace per pod with the other end and a
/// default route through the node. An agent in the node namespace with `--iface` on the
/// host-side veths sits where a DaemonSet with hostNetwork does: a pod's SYN to another pod
/// crosses the cgroup hook (at connect), XDP (arriving on the client pod's host veth) and TC
/// egress (leaving on the upstream pod's host veth). Each pod has a /24 of its own.
pub struct Node {
    // Fields drop in declaration order: the pods' namespaces go first, then the node's.
    pub pods: Vec<Pod>,
    pub node: NetNs,
}

/// One pod of a [`Node`].
pub struct Pod {
    pub ns: NetNs,
    /// The host side of the pod's veth, in the node namespace.
    pub host_if: String,
    /// The pod's addresses.
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
}

impl Node {
    /// A node with `pods` pods (at most 10), named with `prefix`.
    pub fn new(prefix: &str, pods: usize) -> Result<Node> {
        if pods > 10 {
            bail!("a node of at most 10 pods (interface names are short)");
        }
        // Two bytes are left for the role suffix (n, p0..p9, h0..h9).
        let base = unique_name_within(prefix, MAX_IFNAME_LEN - 2);
        let node = NetNs::create(&format!("{base}n"))?;
        node.run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        })?
        .context("enabling forwarding in the node namespace")?;
        let mut node = Node {
            pods: Vec::new(),
            node,
        };
        for i in 0..pods {
            let subnet = Subnet::next();
            let (pod_if, host_if) = (format!("{base}p{i}"), format!("{base}h{i}"));
            let ns = NetNs::create(&pod_if)?;
            node.node.ip(&[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                &pod_if,
                "netns",
                ns.name(),
            ])?;
            let (gateway, addr) = (subnet.host(1), subnet.host(2));
            let (gateway6, addr6) = (subnet.host6(1), subnet.host6(2));
            for (netns, ifname, v4, v6) in [
                (&node.node, &host_if, gateway, gateway6),
                (&ns, &pod_if, addr, addr6),
            ] {
                netns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname])?;
                netns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    ifname,
                    "nodad",
                ])?;
                netns.ip(&["link", "set", ifname, "up"])?;
            }
            ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6.to_string(),
            ])?;
            node.pods.push(Pod {
                ns,
                host_if,
                addr,
                addr6,
            });
        }
        Ok(node)
    }
}

/// A TCP server inside a namespace that is either healthy (listening, accepting and
/// immediately closing connections) or refusing (no listener, so the kernel answers SYNs
/// with RST).
pub struct Upstream {
    ns: NsHandle,
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    reset_after_accept: Arc<AtomicBool>,
    listening: Option<AcceptLoop>,
}

/// The background thread that owns a listener; stopping it closes the socket.
struct AcceptLoop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Upstream {
    /// Starts listening on `addr` inside `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<Upstream> {
        let mut upstream = Upstream {
            ns: ns.ns.try_clone()?,
            addr,
            accepted: Arc::new(AtomicU64::new(0)),
            reset_after_accept: Arc::new(AtomicBool::new(false)),
            listening: None,
        };
        upstream.set_healthy(true)?;
        Ok(upstream)
    }

    /// Opens or closes the listener; a no-op if already in the requested state.
    pub fn set_healthy(&mut self, healthy: bool) -> Result<()> {
        match (healthy, self.listening.take()) {
            (true, None) => self.listening = Some(self.listen()?),
            (false, Some(accept_loop)) => accept_loop.stop(),
            (_, unchanged) => self.listening = unchanged,
        }
        Ok(())
    }

    pub fn is_healthy(&self) -> bool {
        self.listening.is_some()
    }

    /// Whether accepted connections are closed with a RST (SO_LINGER 0) instead of a FIN:
    /// the client sees its established connection reset.
    pub fn set_reset_after_accept(&self, reset: bool) {
        self.reset_after_accept.store(reset, Ordering::Relaxed);
    }

    /// Connections accepted so far, over every healthy period.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    fn listen(&self) -> Result<AcceptLoop> {
        let addr = self.addr;
        // The socket must be created inside the namespace; once it exists, any thread can
        // accept on it. std sets SO_REUSEADDR, so re-binding right after a close works even
        // with connections lingering in TIME_WAIT.
        let listener = self
            .ns
            .run(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in netns {}", self.ns.name))?;
        // Non-blocking, so the loop can notice the stop flag between connections.
        listener.set_nonblocking(true)?;

        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&self.accepted);
            let reset = Arc::clone(&self.reset_after_accept);
            move || {
                loop {
                    match listener.accept() {
                        // Dropping the stream closes the connection right away.
                        Ok((stream, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            if reset.load(Ordering::Relaxed) {
                                linger_zero(&stream);
                            }
                            continue;
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => eprintln!("upstream {addr}: accept failed: {err}"),
                    }
                    // Stopping only once the backlog is empty means every connection a
                    // client saw succeed before the close is counted in `accepted`.
                    if stop.load(Ordering::Relaxed) {
                        // shutdown() closes the socket itself, not just this descriptor: a
                        // copy inherited by a child forked elsewhere in this process (another
                        // test spawning its agent) would otherwise keep it listening.
                        use std::os::fd::AsRawFd;
                        // SAFETY: the descriptor is valid; shutdown only changes its state.
                        unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
                        break;
                    }
                    thread::sleep(ACCEPT_POLL);
                }
            }
        });
        Ok(AcceptLoop { stop, thread })
    }
}

/// SO_LINGER with a zero timeout: closing the socket then sends a RST.
fn linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger` (of the size given) during the call only.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        eprintln!("warning: SO_LINGER failed: {}", io::Error::last_os_error());
    }
}

impl AcceptLoop {
    /// Stops the thread; the listener is closed by the time this returns.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            eprintln!("warning: upstream accept thread panicked");
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(accept_loop) = self.listening.take() {
            accept_loop.stop();
        }
    }
}

/// How one connect attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectResult {
    Connected,
    /// ECONNREFUSED: the peer (or something on the path) answered with RST.
    Refused,
    TimedOut,
    /// Any other failure, as an errno.
    Other(i32),
}

impl ConnectResult {
    /// Classifies a connect outcome; errors that carry no errno are returned unchanged.
    fn classify(outcome: io::Result<TcpStream>) -> io::Result<ConnectResult> {
        let err = match outcome {
            Ok(_) => return Ok(ConnectResult::Connected),
            Err(err) => err,
        };
        match (err.kind(), err.raw_os_error()) {
            (_, Some(libc::ECONNREFUSED)) => Ok(ConnectResult::Refused),
            (io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock, _) => Ok(ConnectResult::TimedOut),
            (_, Some(errno)) => Ok(ConnectResult::Other(errno)),
            (_, None) => Err(err),
        }
    }
}

/// The outcome of [`Client::connect`] and how long the connect call took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub result: ConnectResult,
    pub elapsed: Duration,
}

type Job = Box<dyn FnOnce() + Send>;

/// Connects from inside a namespace. One long-lived thread sits in the namespace and runs
/// the connects, so repeated attempts don't pay for a thread (and a setns) each.
pub struct Client {
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

impl Client {
    pub fn new(ns: &NetNs) -> Result<Client> {
        let ns = ns.ns.try_clone()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let worker = thread::spawn(move || {
            let entered = ns.enter();
            let ok = entered.is_ok();
            // The receiver only disappears if `new` itself went away.
            let _ = ready_tx.send(entered);
            if ok {
                // Ends when the Client drops its sender.
                for job in queue {
                    job();
                }
            }
        });
        ready
            .recv()
            .context("client thread exited before entering its netns")??;
        Ok(Client {
            jobs: Some(jobs),
            worker: Some(worker),
        })
    }

    /// Makes one blocking connect to `to`, giving up after `timeout`. A successful
    /// connection is closed straight away.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> Result<Attempt> {
        self.run_job(move || {
            let start = Instant::now();
            let stream = TcpStream::connect_timeout(&to, timeout);
            (ConnectResult::classify(stream), start.elapsed())
        })
        .and_then(|(result, elapsed)| {
            let result = result.with_context(|| format!("connecting to {to}"))?;
            Ok(Attempt { result, elapsed })
        })
    }

    /// Connects, then reads until the upstream closes the connection or `timeout` passes,
    /// as a client waiting for a response does. Returns the read's errno when it failed
    /// (ECONNRESET when the upstream reset the connection), None on a clean close.
    pub fn connect_and_read(&self, to: SocketAddr, timeout: Duration) -> Result<Option<i32>> {
        self.run_job(move || -> io::Result<Option<i32>> {
            let mut stream = match TcpStream::connect_timeout(&to, timeout) {
                Ok(stream) => stream,
                // The reset can land before connect() returns: the connection was
                // established, then reset, all the same.
                Err(err) if err.raw_os_error() == Some(libc::ECONNRESET) => {
                    return Ok(Some(libc::ECONNRESET));
                }
                Err(err) => return Err(err),
            };
            stream.set_read_timeout(Some(timeout))?;
            let mut buf = [0u8; 256];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(None),
                    Ok(_) => {}
                    Err(err) => return Ok(err.raw_os_error()),
                }
            }
        })?
        .with_context(|| format!("connecting to {to}"))
    }

    /// Runs `job` on the worker thread (inside the namespace) and returns its result.
    fn run_job<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (reply, result) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(job());
        });
        self.jobs
            .as_ref()
            .expect("the sender lives until drop")
            .send(job)
            .map_err(|_| anyhow!("client thread is gone"))?;
        result.recv().context("client thread died during a job")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing the queue ends the worker's loop.
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            eprintln!("warning: client thread panicked");
        }
    }
}

/// One line of the unprivileged client's report: `RESULT SECONDS`.
fn parse_attempt(line: &str) -> Result<Attempt> {
    let (what, seconds) = line
        .trim()
        .rsplit_once(' ')
        .with_context(|| format!("unprivileged client: {line:?}"))?;
    let elapsed = Duration::from_secs_f64(
        seconds
            .parse()
            .with_context(|| format!("unprivileged client: {line:?}"))?,
    );
    let result = match what {
        "connected" => ConnectResult::Connected,
        "refused" => ConnectResult::Refused,
        "timeout" => ConnectResult::TimedOut,
        other => match other.strip_prefix("errno ").and_then(|n| n.parse().ok()) {
            Some(errno) => ConnectResult::Other(errno),
            None => bail!("unprivileged client: {other:?}"),
        },
    };
    Ok(Attempt { result, elapsed })
}

/// A client as a pod runs one: its own process, as the unprivileged user `nobody`, in a
/// cgroup of its own and a network namespace. Each connect is one short-lived process.
pub struct UnprivilegedClient {
    ns: NsHandle,
    /// The client's cgroup (a directory in the cgroup v2 tree), removed on drop.
    cgroup: PathBuf,
}

/// `nobody`'s uid and gid.
const NOBODY: libc::uid_t = 65_534;

impl UnprivilegedClient {
    /// A client in `ns` whose processes join a new cgroup `name` under `cgroup_root`.
    pub fn new(ns: &NetNs, cgroup_root: &Path, name: &str) -> Result<UnprivilegedClient> {
        let cgroup = cgroup_root.join(name);
        std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        Ok(UnprivilegedClient {
            ns: ns.ns.try_clone()?,
            cgroup,
        })
    }

    /// The client's cgroup directory.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// One blocking connect to `to` with `timeout`, from a new process. `elapsed` is the
    /// connect() call's own time, measured in the process (its start-up takes a second under
    /// emulation).
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> Result<Attempt> {
        let mut attempts = self.connect_times(to, timeout, 1)?;
        attempts.pop().context("unprivileged client: no attempt")
    }

    /// `n` blocking connects to `to`, one after the other, each with `timeout`, from one new
    /// process: a client retrying at its own pace, which emulation does not slow down by a
    /// process start-up per attempt.
    pub fn connect_times(
        &self,
        to: SocketAddr,
        timeout: Duration,
        n: usize,
    ) -> Result<Vec<Attempt>> {
        const SCRIPT: &str = "
import errno, socket, sys, time
for _ in range(int(sys.argv[4])):
    s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
    s.settimeout(float(sys.argv[3]))
    start = time.monotonic()
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        result = 'connected'
    except socket.timeout:
        result = 'timeout'
    except OSError as e:
        result = 'refused' if e.errno == errno.ECONNREFUSED else 'errno %d' % e.errno
    elapsed = time.monotonic() - start
    s.close()
    print(result, elapsed, flush=True)
";
        let args = [
            to.ip().to_string(),
            to.port().to_string(),
            timeout.as_secs_f64().to_string(),
            n.to_string(),
        ];
        let out = self.python(SCRIPT, &args)?;
        let attempts = out.lines().map(parse_attempt).collect::<Result<Vec<_>>>()?;
        if attempts.len() != n {
            bail!(
                "unprivileged client: {n} attempts asked, {} reported: {out:?}",
                attempts.len()
            );
        }
        Ok(attempts)
    }

    /// Runs a Python `script` with `args` as this client (its namespace, its cgroup, user
    /// `nobody`) and returns what it printed; a failure carries its stderr.
    pub fn python(&self, script: &str, args: &[String]) -> Result<String> {
        use std::os::unix::ffi::OsStrExt;
        let ns = self.ns.try_clone()?;
        let procs =
            std::ffi::CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script).args(args).stdin(Stdio::null());
        // SAFETY: between fork and exec, only system calls (setns, open/write/close on a path
        // built before the fork, setgroups/setgid/setuid), no allocation. Root work first:
        // the namespace and the cgroup ("0" writes the calling process), then the user.
        unsafe {
            cmd.pre_exec(move || {
                enter_netns(&ns.fd).map_err(io::Error::from)?;
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(fd);
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().context("running python3")?;
        if !out.status.success() {
            bail!(
                "client script failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for UnprivilegedClient {
    fn drop(&mut self) {
        // Its processes have exited; an empty cgroup is removed with rmdir, which says EBUSY
        // for a moment while the last exited process is still being released.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut removed = std::fs::remove_dir(&self.cgroup);
        while matches!(&removed, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
            removed = std::fs::remove_dir(&self.cgroup);
        }
        if let Err(err) = removed {
            eprintln!(
                "warning: cannot remove cgroup {}: {err}",
                self.cgroup.display()
            );
        }
    }
}

/// Locks a mutex, ignoring poisoning: the data guarded here (output lines, a Child) stays
/// consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A child process (e.g. the agent) whose stdout and stderr are collected line by line and
/// echoed to this process's stderr as `[label] line`, so a failing test shows its logs.
/// On drop it gets SIGTERM, then SIGKILL after 5 s, and is reaped.
pub struct ChildProcess {
    label: String,
    pid: u32,
    // Behind a mutex so `&self` methods can check for exit; only this value ever reaps the
    // child, so while the lock is held its pid cannot be reused.
    child: Mutex<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl ChildProcess {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr captured and echoed.
    pub fn spawn(label: &str, cmd: Command) -> Result<ChildProcess> {
        Self::spawn_with(label, cmd, true)
    }

    /// Like [`ChildProcess::spawn`], but collects the output without echoing it (for the
    /// demo, which prints its own narrative).
    pub fn spawn_silent(label: &str, cmd: Command) -> Result<ChildProcess> {
        Self::spawn_with(label, cmd, false)
    }

    fn spawn_with(label: &str, mut cmd: Command, echo: bool) -> Result<ChildProcess> {
        // If this process dies without dropping the value (an abort), the child goes with it:
        // an agent left behind would keep judging every connection of later tests.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {label}: {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            forward_lines(label, stdout, &lines, echo),
            forward_lines(label, stderr, &lines, echo),
        ];
        Ok(ChildProcess {
            label: label.to_owned(),
            pid: child.id(),
            child: Mutex::new(child),
            lines,
            readers,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// All output lines (stdout and stderr interleaved) so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// Waits for an output line containing `needle` and returns it. Fails on timeout or if
    /// the process exits first; either error includes the last output lines.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_output(&format!("a line containing {needle:?}"), timeout, |lines| {
            lines.iter().find(|line| line.contains(needle)).cloned()
        })
    }

    /// Waits until at least `count` output lines contain all of `needles`; returns them all.
    pub fn wait_for_lines(
        &self,
        needles: &[&str],
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let what = format!("{count} line(s) containing all of {needles:?}");
        self.wait_for_output(&what, timeout, |lines| {
            let matching: Vec<String> = lines
                .iter()
                .filter(|line| needles.iter().all(|needle| line.contains(needle)))
                .cloned()
                .collect();
            (matching.len() >= count).then_some(matching)
        })
    }

    /// Sends `sig`; fails if the process has already exited.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if !self.signal_if_running(sig)? {
            bail!("{} (pid {}) has already exited", self.label, self.pid);
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} (pid {}) to exit", self.label, self.pid);
        wait_until(&what, timeout, CHILD_POLL, || self.try_wait().transpose())?
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.exit_status()
    }

    fn exit_status(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("checking on {} (pid {})", self.label, self.pid))
    }

    /// Sends `sig` unless the process has exited; returns whether it was sent.
    fn signal_if_running(&self, sig: Signal) -> Result<bool> {
        let mut child = lock(&self.child);
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        let pid = Pid::from_raw(self.pid.try_into()?);
        signal::kill(pid, sig).with_context(|| format!("sending {sig} to {}", self.label))?;
        Ok(true)
    }

    /// Polls the output until `found` picks something out of it.
    fn wait_for_output<R>(
        &self,
        what: &str,
        timeout: Duration,
        mut found: impl FnMut(&[String]) -> Option<R>,
    ) -> Result<R> {
        let waited = wait_until(what, timeout, CHILD_POLL, || {
            // Checked before reading the lines: once the process has exited and both pipes
            // are drained, this snapshot is final and waiting longer cannot help.
            let finished = match self.exit_status() {
                Ok(status) => status.filter(|_| self.readers.iter().all(|r| r.is_finished())),
                Err(err) => return Some(Err(err)),
            };
            if let Some(result) = found(&self.lines()) {
                return Some(Ok(result));
            }
            finished.map(|status| Err(anyhow!("{} exited ({status})", self.label)))
        });
        waited.and_then(|outcome| outcome).with_context(|| {
            format!(
                "{}: waiting for {what}; last output:\n{}",
                self.label,
                self.tail()
            )
        })
    }

    /// The last few output lines, for error messages.
    fn tail(&self) -> String {
        let lines = lock(&self.lines);
        let start = lines.len().saturating_sub(TAIL_LINES);
        lines[start..].join("\n")
    }

    fn stop(&mut self) -> Result<()> {
        if !self.signal_if_running(Signal::SIGTERM)? || self.wait(KILL_GRACE).is_ok() {
            return Ok(());
        }
        self.signal_if_running(Signal::SIGKILL)?;
        // SIGKILL cannot be caught, so this wait is short.
        lock(&self.child).wait()?;
        Ok(())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // The reader threads are left to finish on their own: a grandchild holding the pipes
        // open must not hang the drop.
        if let Err(err) = self.stop() {
            eprintln!(
                "warning: failed to stop {} (pid {}): {err:#}",
                self.label, self.pid
            );
        }
    }
}

/// Copies `pipe` line by line into `lines`, echoing each line to stderr when `echo` is set.
fn forward_lines(
    label: &str,
    pipe: impl Read + Send + 'static,
    lines: &Arc<Mutex<Vec<String>>>,
    echo: bool,
) -> JoinHandle<()> {
    let label = label.to_owned();
    let lines = Arc::clone(lines);
    thread::spawn(move || {
        // Split on bytes so non-UTF-8 output is kept (lossily) instead of ending the copy.
        for line in BufReader::new(pipe).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if echo {
                eprintln!("[{label}] {line}");
            }
            lock(&lines).push(line);
        }
    })
}

/// A directory (e.g. a bpffs pin directory) removed recursively on drop.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                eprintln!("warning: failed to remove {}: {err}", self.0.display());
            }
            _ => {}
        }
    }
}

/// How many times longer than written every wait lasts: `CIRCUIT_TEST_WAIT_SCALE` (an
/// integer, default 1). `cargo xtask vm-test` raises it for VMs under emulation, where
/// everything runs several times slower. A wait bounds how long a test waits for something
/// that will happen, never a window it has to happen in, so stretching it only changes how
/// long a failure takes to show.
pub fn wait_scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("CIRCUIT_TEST_WAIT_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n >= 1)
            .unwrap_or(1)
    })
}

/// Calls `f` every `every` until it returns `Some`, failing with `what` in the message once
/// `timeout` (times [`wait_scale`]) has passed. `f` always runs at least once, and once more
/// at the deadline.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let timeout = timeout * wait_scale();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every.min(deadline - now));
    }
}

/// An HTTP/1.1 GET of `path` on `addr`, made from inside `ns` (where an agent serves its
/// metrics and health on loopback). Returns the status code and the body.
pub fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let response = ns.run(move || -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        io::Write::write_all(&mut stream, request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })??;
    let status = response
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok((status, body))
}

/// The sum of the samples of metric `name` (every label set) in a Prometheus text page;
/// None when the page has none.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The `circuit-agent` binary under test: `$CIRCUIT_AGENT_BIN` (set by `cargo xtask test`),
/// else the one cargo built next to this test executable (target/<profile>/circuit-agent).
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CIRCUIT_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>/circuit-agent
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("circuit-agent"))
        .context("unexpected test executable location")?;
    if !candidate.exists() {
        anyhow::bail!(
            "{} not found: build it first (`cargo build -p circuit-agent`) or run `cargo xtask test`",
            candidate.display()
        );
    }
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn unique_names_fit_interface_names_and_do_not_repeat() {
        let names: Vec<String> = ["cbc", "", "a-very-long-prefix-indeed", "é"]
            .iter()
            .cycle()
            .take(400)
            .map(|prefix| unique_name(prefix))
            .collect();
        assert!(
            names.iter().all(|name| name.len() <= MAX_IFNAME_LEN),
            "{names:?}"
        );
        assert_eq!(names.iter().collect::<HashSet<_>>().len(), names.len());
        assert!(unique_name("cbc").starts_with("cbc"));
        assert!(unique_name_within("a-very-long-prefix", 14).len() <= 14);
    }

    #[test]
    fn base36_is_fixed_width() {
        assert_eq!(base36(0, 3), "000");
        assert_eq!(base36(35, 3), "00z");
        assert_eq!(base36(36 * 36 * 36 + 37, 3), "011");
    }

    #[test]
    fn subnets_stay_in_range() {
        for _ in 0..600 {
            let subnet = Subnet::next();
            assert!((100..200).contains(&subnet.x));
            assert!((1..=250).contains(&subnet.y));
        }
    }

    #[test]
    fn wait_until_returns_the_first_value() {
        let mut calls = 0;
        let value = wait_until(
            "three calls",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                calls += 1;
                (calls == 3).then_some(calls)
            },
        );
        assert_eq!(value.unwrap(), 3);
    }

    #[test]
    fn wait_until_times_out_with_the_description() {
        let start = Instant::now();
        let err = wait_until(
            "the impossible",
            Duration::from_millis(50),
            Duration::from_millis(10),
            || None::<()>,
        )
        .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(err.to_string().contains("the impossible"), "{err}");
    }
}
