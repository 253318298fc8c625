//! The kernel side: loads circuit's programs, pins and adopts their maps, attaches the
//! tracepoints and the XDP enforcement point, and gives typed access to the maps. It knows
//! nothing of breaker rules: it stores and reports what it is told.

mod mounts;
pub mod outcomes;
mod tracefs;
pub mod verdicts;
mod xdp;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use circuit_common::{Stat, TRACEPOINT_LAYOUT_GLOBAL, UpstreamKey, map_names, program_names};
pub use mounts::{ensure_bpffs, ensure_tracefs};
pub use outcomes::{Outcome, OutcomeStream};
pub use verdicts::{StoredVerdict, VerdictTable};
pub use xdp::{AttachedXdp, XdpModeChoice};

/// The kernel programs, built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/circuit"));

/// Where pins go by default: one directory per agent under the bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/circuit";

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
/// a restarted agent adopts the verdicts of the previous one).
fn load(pin_dir: &Path, tracefs: &Path) -> anyhow::Result<Ebpf> {
    if PROGRAMS.is_empty() {
        bail!("this circuit-agent was built with AYA_BUILD_SKIP=1 and carries no kernel programs");
    }
    let layout = tracefs::read_layout(tracefs)?;
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global(TRACEPOINT_LAYOUT_GLOBAL, &layout, true)
        .load(PROGRAMS)
        .with_context(|| {
            format!(
                "cannot load circuit's kernel programs (pins in {}; a pinned map from an incompatible version must be removed with `circuit-agent detach`)",
                pin_dir.display()
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
        let path = pin_dir.join(map_names::STATS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("no statistics map at {}", path.display()))?;
        Self::from_map(Map::PerCpuArray(data))
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

/// What `attach` asks of the kernel.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeChoice,
}

/// circuit's programs, loaded and attached. Dropping it detaches the programs; the pinned
/// maps stay for the next agent (leases make sure stale verdicts stop being enforced).
pub struct Dataplane {
    // Owns the programs and their links.
    _ebpf: Ebpf,
    pub verdicts: VerdictTable,
    pub stats: Stats,
    outcomes: Option<OutcomeStream>,
    pub xdp: Vec<AttachedXdp>,
}

impl Dataplane {
    pub fn attach(options: &DataplaneOptions) -> anyhow::Result<Self> {
        ensure_bpffs(&options.pin_dir)?;
        let tracefs = ensure_tracefs()?;
        let mut ebpf = load(&options.pin_dir, &tracefs)?;

        for (program, category, name) in [
            (program_names::TP_SET_STATE, "sock", "inet_sock_set_state"),
            (program_names::TP_RECEIVE_RESET, "tcp", "tcp_receive_reset"),
        ] {
            let tp: &mut TracePoint = ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing from the object"))?
                .try_into()?;
            tp.load()
                .with_context(|| format!("the kernel refused {program}"))?;
            tp.attach(category, name)
                .with_context(|| format!("cannot attach to tracepoint {category}:{name}"))?;
        }

        let xdp = xdp::attach_all(&mut ebpf, &options.interfaces, options.xdp_mode)?;

        let verdicts = VerdictTable::from_map(take_map(&mut ebpf, map_names::VERDICTS)?)?;
        let stats = Stats::from_map(take_map(&mut ebpf, map_names::STATS)?)?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, map_names::OUTCOMES)?)
            .context("OUTCOMES is not a ring buffer")?;
        Ok(Self {
            _ebpf: ebpf,
            verdicts,
            stats,
            outcomes: Some(OutcomeStream::new(ring)?),
            xdp,
        })
    }

    /// The outcome stream; there is one, so this returns it once.
    pub fn take_outcomes(&mut self) -> Option<OutcomeStream> {
        self.outcomes.take()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// Loads the XDP enforcement program alone, without attaching anything, with its maps
/// pinned in `pin_dir`: for BPF_PROG_TEST_RUN fixtures and benchmarks.
pub struct XdpUnderTest {
    pub ebpf: Ebpf,
    pub verdicts: VerdictTable,
}

impl XdpUnderTest {
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        let tracefs = ensure_tracefs()?;
        let mut ebpf = load(pin_dir, &tracefs)?;
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(program_names::XDP_ENFORCE)
            .context("xdp program missing")?
            .try_into()?;
        prog.load().context("the kernel refused the XDP program")?;
        let verdicts = VerdictTable::open_pinned(pin_dir)?;
        Ok(Self { ebpf, verdicts })
    }

    pub fn program(&self) -> &aya::programs::Xdp {
        self.ebpf
            .program(program_names::XDP_ENFORCE)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in XdpUnderTest::load")
    }
}

/// Removes everything `attach` pinned under `pin_dir`. Returns the paths removed.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", pin_dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))?;
        removed.push(path);
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("cannot remove {}", pin_dir.display()))?;
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
