//! The kernel side: loads circuit's programs, pins and adopts their maps, attaches the
//! tracepoints and the XDP enforcement point, and gives typed access to the maps. It knows
//! nothing of breaker rules: it stores and reports what it is told.

mod cgroup;
pub(crate) mod conntrack;
pub mod features;
mod links;
mod mounts;
pub mod outcomes;
pub mod overrides;
mod pins;
pub mod tracefs;
pub mod verdicts;
mod xdp;

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::TracePoint,
};
pub use cgroup::{CgroupNames, ensure_cgroup2_root, find_cgroup2_root};
use circuit_common::{
    CGROUP_SET_RETVAL_GLOBAL, CONNTRACK_LAYOUT_GLOBAL, CONTROL_GLOBAL, CONTROL_SECTION,
    ConnectOutcome, Control, LINKS_DIR, OutcomeCounters, Stat, TRACEPOINT_LAYOUT_GLOBAL,
    UpstreamKey, map_names, program_names,
};
pub use features::Features;
pub use mounts::{ensure_bpffs, ensure_tracefs};
pub use outcomes::{Outcome, OutcomeStream};
pub use overrides::{OverrideTable, StoredOverride};
pub use verdicts::{Route, StoredClientVerdict, StoredVerdict, VerdictSpec, VerdictTable};
pub use xdp::{AttachedXdp, XdpModeChoice};

use crate::lock::ExclusiveLock;

/// The kernel programs, built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/circuit"));

/// Where pins go by default: one directory per agent under the bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/circuit";

/// Where new connections to an isolated upstream are stopped.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Enforcer {
    /// connect() of every local process fails with ECONNREFUSED before a packet exists.
    Cgroup,
    /// SYNs arriving on `--iface` are answered with a RST (XDP_TX).
    Xdp,
    /// SYNs leaving through `--iface` are turned into a RST back to the sender (TC egress).
    Tc,
}

impl fmt::Display for Enforcer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Enforcer::Cgroup => "cgroup",
            Enforcer::Xdp => "xdp",
            Enforcer::Tc => "tc",
        })
    }
}

pub fn upstream_key(addr: SocketAddr) -> UpstreamKey {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    UpstreamKey::new(ip.octets(), addr.port())
}

pub fn socket_addr(key: &UpstreamKey) -> SocketAddr {
    let ip = Ipv6Addr::from(key.addr);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, key.port)
}

/// Loads the object with `pin_dir` as the home of the pinned maps (reused when present, so
/// a restarted agent adopts the verdicts of the previous one), fitted to the kernel's
/// `features`.
fn load(pin_dir: &Path, features: &Features) -> anyhow::Result<Ebpf> {
    if PROGRAMS.is_empty() {
        bail!("this circuit-agent was built with AYA_BUILD_SKIP=1 and carries no kernel programs");
    }
    pins::reconcile(pin_dir, PROGRAMS)?;
    if let Some(problem) = features.outcomes_problem() {
        bail!("cannot watch connection outcomes on this kernel: {problem}");
    }
    let layout = features
        .layout
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .offsets;
    let set_retval = u32::from(features.set_retval);
    let conntrack = features
        .conntrack
        .as_ref()
        .map(|c| c.offsets)
        .unwrap_or_default();
    // The loader writes a data section's initial value into its map even when it reuses a
    // pinned one: start from the switch the running programs see, so that they keep
    // enforcing while this agent takes over. A write by another process in between (a CLI
    // `trip` while no agent answers) is overwritten: the agent recomputes the verdict counts
    // right after (VerdictTable::rebuild) and the exempt count when it applies its config.
    let control_pin = pin_dir.join(map_names::CONTROL);
    let control = pinned_control(&control_pin)?;
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_pin_path(CONTROL_SECTION, control_pin.as_path())
        .override_global(TRACEPOINT_LAYOUT_GLOBAL, &layout, true)
        .override_global(CONTROL_GLOBAL, &control, true)
        .override_global(CGROUP_SET_RETVAL_GLOBAL, &set_retval, true)
        .override_global(CONNTRACK_LAYOUT_GLOBAL, &conntrack, true)
        .load(PROGRAMS)
        .with_context(|| {
            format!(
                "cannot load circuit's kernel programs (pins in {}; a pinned map from an incompatible version must be removed with `circuit-agent detach`)",
                pin_dir.display()
            )
        })
}

/// The fast-path switch pinned at `path`, or all zeros when nothing is pinned there yet.
fn pinned_control(path: &Path) -> anyhow::Result<Control> {
    if !path.exists() {
        return Ok(Control::default());
    }
    let map = MapData::from_pin(path)
        .with_context(|| format!("cannot open the pinned switch {}", path.display()))?;
    aya::maps::Array::<_, Control>::try_from(Map::Array(map))
        .and_then(|array| array.get(&0, 0))
        .with_context(|| format!("{} is not circuit's fast-path switch", path.display()))
}

/// A lookup or delete that found no such key: aya reports a missing key on lookup as
/// `KeyNotFound` but on delete as the syscall's ENOENT.
fn is_not_found(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn open_pinned(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "no map at {} (has `circuit-agent attach` run with this pin directory?)",
            path.display()
        )
    })
}

/// Sum of a per-CPU counter over all CPUs.
pub struct Stats {
    map: PerCpuArray<MapData, u64>,
}

impl Stats {
    fn from_map(map: Map) -> anyhow::Result<Self> {
        Ok(Self {
            map: PerCpuArray::try_from(map).context("STATS is not the expected per-CPU array")?,
        })
    }

    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        Self::from_map(Map::PerCpuArray(open_pinned(pin_dir, map_names::STATS)?))
    }

    pub fn get(&self, stat: Stat) -> anyhow::Result<u64> {
        let values = self
            .map
            .get(&(stat as u32), 0)
            .with_context(|| format!("cannot read {}", stat.name()))?;
        Ok(values.iter().sum())
    }

    pub fn all(&self) -> anyhow::Result<Vec<(Stat, u64)>> {
        Stat::ALL.iter().map(|s| Ok((*s, self.get(*s)?))).collect()
    }
}

/// Outcome counts per upstream, kept by the kernel itself: complete even when the ring
/// buffer overflowed.
pub struct UpstreamCounts {
    map: HashMap<MapData, UpstreamKey, OutcomeCounters>,
}

impl UpstreamCounts {
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let data = open_pinned(pin_dir, map_names::UPSTREAM_COUNTS)?;
        Ok(Self {
            map: HashMap::try_from(Map::LruHashMap(data))
                .context("UPSTREAM_COUNT is not the expected LRU hash map")?,
        })
    }

    /// The count of each outcome for `upstream` (zeros when never seen).
    pub fn get(&self, upstream: SocketAddr) -> anyhow::Result<Vec<(ConnectOutcome, u64)>> {
        let counters = match self.map.get(&upstream_key(upstream), 0) {
            Ok(c) => c,
            Err(MapError::KeyNotFound) => OutcomeCounters::default(),
            Err(e) => return Err(e).context("cannot read outcome counters"),
        };
        Ok(ConnectOutcome::ALL
            .iter()
            .map(|o| (*o, counters.counts[OutcomeCounters::slot(*o)]))
            .collect())
    }
}

/// Clients (by cgroup, with everything below it) whose connections are never rejected by
/// the cgroup and TC hooks.
pub struct ExemptCgroups {
    map: HashMap<MapData, u64, u8>,
    control: aya::maps::Array<MapData, circuit_common::Control>,
    /// The configured priority cgroups, each with the id it resolves to now (None: no such
    /// cgroup at the moment).
    priority: Vec<PriorityCgroup>,
}

/// A configured priority cgroup and the cgroup id its path resolves to now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityCgroup {
    pub path: PathBuf,
    pub id: Option<u64>,
}

impl ExemptCgroups {
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let data = open_pinned(pin_dir, map_names::EXEMPT_CGROUPS)?;
        let control = open_pinned(pin_dir, map_names::CONTROL)?;
        Ok(Self {
            map: HashMap::try_from(Map::HashMap(data)).context("EXEMPT_CGROUPS has a bad type")?,
            control: aya::maps::Array::try_from(Map::Array(control))
                .context("CONTROL is not the expected array")?,
            priority: Vec::new(),
        })
    }

    /// Exempts the cgroups at `paths` (directories in the cgroup v2 tree; a cgroup's id is
    /// its directory's inode number) and nothing else. A path with no cgroup yet is kept
    /// and resolved by [`Self::refresh`] once it appears.
    pub fn configure(&mut self, paths: &[PathBuf]) -> anyhow::Result<&[PriorityCgroup]> {
        self.priority = paths
            .iter()
            .map(|path| PriorityCgroup {
                path: path.clone(),
                id: None,
            })
            .collect();
        for cgroup in &mut self.priority {
            cgroup.id = cgroup_id(&cgroup.path);
        }
        self.write()?;
        Ok(&self.priority)
    }

    /// Resolves the configured paths again: a restarted service gets a new cgroup, with a
    /// new id, at the same path. Returns the cgroups whose id changed (written already).
    pub fn refresh(&mut self) -> anyhow::Result<Vec<PriorityCgroup>> {
        let mut changed = Vec::new();
        for cgroup in &mut self.priority {
            let id = cgroup_id(&cgroup.path);
            if id != cgroup.id {
                cgroup.id = id;
                changed.push(cgroup.clone());
            }
        }
        if !changed.is_empty() {
            self.write()?;
        }
        Ok(changed)
    }

    pub fn priority(&self) -> &[PriorityCgroup] {
        &self.priority
    }

    fn write(&mut self) -> anyhow::Result<()> {
        let wanted: Vec<u64> = self.priority.iter().filter_map(|c| c.id).collect();
        let stale: Vec<u64> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !wanted.contains(id))
            .collect();
        for id in stale {
            let _ = self.map.remove(&id);
        }
        for id in &wanted {
            self.map
                .insert(id, 1, 0)
                .context("cannot add a priority cgroup")?;
        }
        // The kernel skips the cgroup walk while the count is 0.
        let mut control = self.control.get(&0, 0).unwrap_or_default();
        control.exempt_cgroups = wanted.len() as u32;
        self.control
            .set(0, control, 0)
            .context("cannot update the fast-path switch")
    }
}

/// The id of the cgroup at `path` (its directory's inode), if there is one.
fn cgroup_id(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.ino())
}

/// Log records of the kernel programs (aya-log), forwarded into this process's logging
/// (the `log` facade, which tracing-subscriber bridges into tracing).
pub struct KernelLog {
    fd: tokio::io::unix::AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl KernelLog {
    fn new(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let logger =
            aya_log::EbpfLogger::init(ebpf).context("cannot read the kernel's log records")?;
        // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged, for as
        // long as the AsyncFd owns the logger.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("cannot register the kernel log with tokio: {e}"))?;
        Ok(Self { fd })
    }

    /// Waits for records and forwards them.
    pub async fn forward(&mut self) -> anyhow::Result<()> {
        let mut guard = self
            .fd
            .readable_mut()
            .await
            .context("kernel log poll failed")?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
        Ok(())
    }
}

/// What `attach` asks of the kernel.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    pub enforcers: Vec<Enforcer>,
}

/// circuit's programs, loaded and attached. The tracepoints live as long as this value; the
/// enforcement links are pinned and outlive it (see `links`), as do the maps.
pub struct Dataplane {
    // Owns the programs and the tracepoint links.
    _ebpf: Ebpf,
    /// This agent's hold on the pin dir, for as long as it runs.
    _lock: ExclusiveLock,
    pub verdicts: VerdictTable,
    pub stats: Stats,
    outcomes: Option<OutcomeStream>,
    log: Option<KernelLog>,
    /// Human-readable list of what was attached, e.g. "cgroup /sys/fs/cgroup, xdp eth0 (native)".
    pub attached: Vec<String>,
    /// Pinned links of an earlier configuration that this one detached (by pin name).
    pub detached: Vec<String>,
    /// Whether endpoints behind virtual addresses are resolved (the conntrack probe runs).
    pub resolving: bool,
}

impl Dataplane {
    pub fn attach(options: &DataplaneOptions) -> anyhow::Result<Self> {
        ensure_bpffs(&options.pin_dir)?;
        // Before anything is pinned or reset: two agents on one pin dir undo each other.
        let lock = ExclusiveLock::directory(&options.pin_dir, "another circuit agent")?;
        let tracefs = ensure_tracefs()?;
        let features = Features::probe(&tracefs);
        features.log();
        let mut ebpf = load(&options.pin_dir, &features)?;
        let log = KernelLog::new(&mut ebpf)?;
        mounts::ensure_owned_dir(&links::links_dir(&options.pin_dir))
            .context("cannot create the links directory")?;

        let layout = features.layout.as_ref().expect("checked by load");
        for tp in tracefs::TRACEPOINTS.iter().filter(|tp| layout.has(tp)) {
            let prog: &mut TracePoint = ebpf
                .program_mut(tp.program)
                .with_context(|| format!("program {} missing from the object", tp.program))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused {}", tp.program))?;
            prog.attach(tp.category, tp.name).with_context(|| {
                format!("cannot attach to tracepoint {}:{}", tp.category, tp.name)
            })?;
        }

        let resolving = resolve_services(&mut ebpf, &features);

        // The links this configuration wants, by pin name: any other pinned link is an
        // earlier configuration's, still enforcing with an earlier program.
        let mut wanted: Vec<String> = Vec::new();
        if track_syns(&mut ebpf, &options.pin_dir, &options.enforcers)? {
            wanted.push(program_names::SOCKOPS_CONNECT.to_owned());
        }

        let mut attached = Vec::new();
        let loaded = |ebpf: &mut Ebpf, names: &[&str]| -> anyhow::Result<()> {
            for name in names {
                let prog = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing from the object"))?;
                prog_load(prog).with_context(|| format!("the kernel refused {name}"))?;
            }
            Ok(())
        };
        let mut enforcers = options.enforcers.clone();
        enforcers.sort();
        enforcers.dedup();
        for enforcer in enforcers {
            match enforcer {
                Enforcer::Cgroup => {
                    loaded(
                        &mut ebpf,
                        &[
                            program_names::CGROUP_CONNECT4,
                            program_names::CGROUP_CONNECT6,
                            program_names::CGROUP_GETPEERNAME4,
                            program_names::CGROUP_GETPEERNAME6,
                        ],
                    )?;
                    let root = ensure_cgroup2_root()?;
                    links::attach_cgroup(&mut ebpf, &options.pin_dir, &root)?;
                    wanted.extend(links::CGROUP_PROGRAMS.map(str::to_owned));
                    attached.push(format!("cgroup {}", root.display()));
                }
                Enforcer::Xdp => {
                    loaded(&mut ebpf, &[program_names::XDP_ENFORCE])?;
                    for iface in &options.interfaces {
                        let xdp = links::attach_xdp(
                            &mut ebpf,
                            &options.pin_dir,
                            iface,
                            options.xdp_mode,
                        )?;
                        attached.push(format!("xdp {xdp}"));
                        wanted.push(links::xdp_pin_name(iface));
                    }
                }
                Enforcer::Tc => {
                    loaded(&mut ebpf, &[program_names::TC_ENFORCE])?;
                    for iface in &options.interfaces {
                        links::attach_tc(&mut ebpf, &options.pin_dir, iface)?;
                        wanted.push(links::tc_pin_name(iface));
                        attached.push(format!("tc egress {iface}"));
                    }
                }
            }
        }

        let detached = links::detach_unwanted(&options.pin_dir, &wanted)?;
        for link in &detached {
            tracing::warn!(
                link,
                "detached a pinned link this configuration no longer wants (an earlier run's enforcement point or interface)"
            );
        }

        let mut verdicts = VerdictTable::open_pinned(&options.pin_dir)?;
        verdicts.rebuild()?;
        let stats = Stats::from_map(take_map(&mut ebpf, map_names::STATS)?)?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, map_names::OUTCOMES)?)
            .context("OUTCOMES is not a ring buffer")?;
        Ok(Self {
            _ebpf: ebpf,
            _lock: lock,
            verdicts,
            stats,
            outcomes: Some(OutcomeStream::new(ring)?),
            log: Some(log),
            attached,
            detached,
            resolving,
        })
    }

    /// The kernel log forwarder; there is one, so this returns it once.
    pub fn take_log(&mut self) -> Option<KernelLog> {
        self.log.take()
    }

    /// The outcome stream; there is one, so this returns it once.
    pub fn take_outcomes(&mut self) -> Option<OutcomeStream> {
        self.outcomes.take()
    }
}

/// Attaches the program that resolves the endpoint behind a virtual address from conntrack
/// (see `circuit-ebpf`'s `services`); returns whether it runs. Not pinned: resolution lives
/// with the agent, and without it outcomes name the virtual address, as before.
fn resolve_services(ebpf: &mut Ebpf, features: &Features) -> bool {
    if let Err(why) = &features.conntrack {
        tracing::warn!(reason = %why, "service resolution off: a virtual address (Service IP, DNAT) is judged as one upstream");
        return false;
    }
    let attached = (|| -> anyhow::Result<()> {
        let name = program_names::RAW_TP_NET_DEV_QUEUE;
        let prog: &mut aya::programs::RawTracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused {name}"))?;
        let tracepoint = program_names::NET_DEV_QUEUE;
        prog.attach(tracepoint)
            .with_context(|| format!("cannot attach to the raw tracepoint {tracepoint}"))?;
        Ok(())
    })();
    match attached {
        Ok(()) => {
            tracing::info!(
                "service resolution on: endpoints behind virtual addresses are read from conntrack"
            );
            true
        }
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "service resolution off: a virtual address (Service IP, DNAT) is judged as one upstream");
            false
        }
    }
}

/// Attaches the sock_ops program that notes each SYN going out (and carries the cgroup
/// hook's admissions over to XDP and TC), and says in SYN_TRACKING whether it runs. Without
/// it, connects deferred by TCP_FASTOPEN_CONNECT and closed unwritten look like aborted
/// attempts; with cgroup enforcement it is required.
fn track_syns(ebpf: &mut Ebpf, pin_dir: &Path, enforcers: &[Enforcer]) -> anyhow::Result<bool> {
    let attached =
        ensure_cgroup2_root().and_then(|root| links::attach_sock_ops(ebpf, pin_dir, &root));
    let on = match attached {
        Ok(()) => 1,
        Err(err) if enforcers.contains(&Enforcer::Cgroup) => return Err(err),
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "no sock_ops program: a connect deferred by TCP_FASTOPEN_CONNECT and closed before its first write counts as an aborted attempt");
            0
        }
    };
    let mut tracking =
        aya::maps::Array::<_, u32>::try_from(take_map(ebpf, map_names::SYN_TRACKING)?)
            .context("SYN_TRACKING is not the expected array")?;
    tracking
        .set(0, on, 0)
        .context("cannot write SYN_TRACKING")?;
    Ok(on == 1)
}

fn prog_load(prog: &mut aya::programs::Program) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::Program;
    match prog {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// The enforcement programs loaded but not attached, with their maps pinned in `pin_dir`:
/// for BPF_PROG_TEST_RUN fixtures and benchmarks.
pub struct ProgramsUnderTest {
    pub ebpf: Ebpf,
    pub verdicts: VerdictTable,
}

impl ProgramsUnderTest {
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        let tracefs = ensure_tracefs()?;
        let mut ebpf = load(pin_dir, &Features::probe(&tracefs))?;
        for name in [
            program_names::XDP_ENFORCE,
            program_names::XDP_BASELINE,
            program_names::TC_ENFORCE,
        ] {
            let prog = ebpf.program_mut(name).context("program missing")?;
            prog_load(prog).with_context(|| format!("the kernel refused {name}"))?;
        }
        let verdicts = VerdictTable::open_pinned(pin_dir)?;
        Ok(Self { ebpf, verdicts })
    }

    pub fn xdp(&self, name: &str) -> &aya::programs::Xdp {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in ProgramsUnderTest::load")
    }

    pub fn tc(&self) -> &aya::programs::SchedClassifier {
        self.ebpf
            .program(program_names::TC_ENFORCE)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in ProgramsUnderTest::load")
    }
}

/// Removes everything `attach` pinned under `pin_dir`: links first (detaching the
/// enforcement programs), then the maps. Only circuit's own pins go, by name, from a pin
/// directory that is circuit's (see [`mounts`]); anything else there is left and named.
/// Returns the paths removed.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !mounts::owned_pin_dir(pin_dir)? {
        return Ok(Vec::new());
    }
    // Not from under a running agent: it would re-create them, half of them.
    let _lock = ExclusiveLock::directory(pin_dir, "a running circuit agent")?;
    let mut removed = links::remove_links(pin_dir)?;
    let maps = pins::pinned_map_names(PROGRAMS)?;
    removed.extend(remove_pinned_dir(pin_dir, |name| {
        maps.iter().any(|m| m == name)
    })?);
    Ok(removed)
}

/// Unpins the entries of `dir` that `ours` recognises, then removes `dir` if nothing else
/// is left in it (a subdirectory, or a file circuit did not make: named in the error).
fn remove_pinned_dir(dir: &Path, ours: impl Fn(&str) -> bool) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut removed = Vec::new();
    let mut foreign = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Pins are files on bpffs; a symlink or a directory is not circuit's.
        if entry.file_type()?.is_file() && ours(&name) {
            let path = entry.path();
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot unpin {}", path.display()))?;
            removed.push(path);
        } else if name != LINKS_DIR {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        bail!(
            "removed circuit's {} pin(s) from {}, and left what circuit did not make there: {}",
            removed.len(),
            dir.display(),
            foreign.join(", ")
        );
    }
    std::fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_upstream_keys() {
        for s in ["10.1.2.3:8080", "[2001:db8::7]:443", "[::1]:1"] {
            let addr: SocketAddr = s.parse().unwrap();
            assert_eq!(socket_addr(&upstream_key(addr)), addr);
        }
        let v4: SocketAddr = "192.0.2.1:53".parse().unwrap();
        assert_eq!(upstream_key(v4), UpstreamKey::v4([192, 0, 2, 1], 53));
    }
}
