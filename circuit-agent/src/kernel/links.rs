//! Attaching circuit's enforcement programs with links pinned under `<pin dir>/links/`, so
//! protection outlives the agent process: a stopped agent leaves its programs enforcing
//! (until the verdict leases end), and the next agent takes the links over.
//!
//! Takeover: XDP allows one program per interface, so the new program atomically replaces
//! the old one inside the pinned link. cgroup and tcx links allow several programs: the new
//! one is attached first, then the old pin is removed, which lets the kernel detach the old
//! program shortly after; both read the same pinned maps in between, so nothing changes for
//! traffic.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, SockOps, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc,
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use circuit_common::{LINKS_DIR, program_names};

use super::xdp::{AttachedXdp, XdpModeChoice, choose_mode};

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS_DIR)
}

pub fn xdp_pin_name(iface: &str) -> String {
    format!("xdp_{iface}")
}

pub fn tc_pin_name(iface: &str) -> String {
    format!("tc_{iface}")
}

/// Detaches and unpins every link of circuit's in the links directory that is not in
/// `wanted` (pin names); returns their names.
pub fn detach_unwanted(pin_dir: &Path, wanted: &[String]) -> anyhow::Result<Vec<String>> {
    let dir = links_dir(pin_dir);
    let mut detached = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_file() || !is_link_pin(&name) || wanted.contains(&name) {
            continue;
        }
        let path = entry.path();
        if let Err(err) = detach_pinned_link(&path) {
            tracing::warn!(link = %path.display(), %err, "cannot detach the link on request; unpinning it");
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))?;
        detached.push(name);
    }
    detached.sort();
    Ok(detached)
}

/// The cgroup programs of cgroup enforcement: the connect hooks, and getpeername for the
/// sockets they re-route.
pub const CGROUP_PROGRAMS: [&str; 4] = [
    program_names::CGROUP_CONNECT4,
    program_names::CGROUP_CONNECT6,
    program_names::CGROUP_GETPEERNAME4,
    program_names::CGROUP_GETPEERNAME6,
];

/// Whether `name` in the links directory is a link circuit pins there.
pub fn is_link_pin(name: &str) -> bool {
    name.starts_with("xdp_")
        || name.starts_with("tc_")
        || name == program_names::SOCKOPS_CONNECT
        || CGROUP_PROGRAMS.contains(&name)
}

/// Pins `link` at `path`, replacing (and so detaching) whatever an older agent pinned there.
fn pin_replacing(link: FdLink, path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot unpin {}", path.display())),
    }
    link.pin(path)
        .with_context(|| format!("cannot pin link at {}", path.display()))?;
    Ok(())
}

fn into_fd_link<L>(link: L) -> anyhow::Result<FdLink>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    FdLink::try_from(link).context("the kernel gave a link that cannot be pinned")
}

pub fn attach_xdp(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    iface: &str,
    choice: XdpModeChoice,
) -> anyhow::Result<AttachedXdp> {
    let prog: &mut Xdp = program(ebpf, program_names::XDP_ENFORCE)?;
    let path = links_dir(pin_dir).join(xdp_pin_name(iface));
    if path.exists() {
        // Take over the previous agent's link: same interface, same mode, new program.
        let old = PinnedLink::from_pin(&path)
            .with_context(|| format!("cannot open pinned link {}", path.display()))?
            .unpin()
            .context("cannot unpin the previous XDP link")?;
        let link = XdpLink::try_from(old).context("pinned link is not an XDP link")?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                pin_replacing(into_fd_link(prog.take_link(id)?)?, &path)?;
                return Ok(AttachedXdp {
                    interface: iface.to_owned(),
                    mode: "taken over".to_owned(),
                });
            }
            // E.g. a link already detached (a `detach` that could not finish unpinning):
            // nothing to take over, so attach anew.
            Err(err) => {
                tracing::warn!(iface, %err, "cannot take over the pinned XDP link; attaching anew");
            }
        }
    }
    let mode = choose_mode(iface, choice)?;
    let id = match prog.attach(iface, mode) {
        Ok(id) => id,
        Err(err) if choice == XdpModeChoice::Auto && mode == XdpMode::Driver => {
            tracing::warn!(iface, %err, "native XDP unavailable, using generic mode");
            return attach_fresh_generic(prog, &path, iface);
        }
        Err(err) => {
            return Err(err).with_context(|| format!("cannot attach XDP ({mode:?}) to {iface}"));
        }
    };
    pin_replacing(into_fd_link(prog.take_link(id)?)?, &path)?;
    Ok(AttachedXdp {
        interface: iface.to_owned(),
        mode: if mode == XdpMode::Driver {
            "native"
        } else {
            "generic"
        }
        .to_owned(),
    })
}

fn attach_fresh_generic(prog: &mut Xdp, path: &Path, iface: &str) -> anyhow::Result<AttachedXdp> {
    let id = prog
        .attach(iface, XdpMode::Skb)
        .with_context(|| format!("cannot attach XDP (generic) to {iface}"))?;
    pin_replacing(into_fd_link(prog.take_link(id)?)?, path)?;
    Ok(AttachedXdp {
        interface: iface.to_owned(),
        mode: "generic".to_owned(),
    })
}

pub fn attach_tc(ebpf: &mut Ebpf, pin_dir: &Path, iface: &str) -> anyhow::Result<()> {
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        // Before tcx, classifiers hang off a clsact qdisc; it may exist already.
        let _ = tc::qdisc_add_clsact(iface);
    }
    let prog: &mut SchedClassifier = program(ebpf, program_names::TC_ENFORCE)?;
    let id = prog
        .attach(iface, TcAttachType::Egress)
        .with_context(|| format!("cannot attach the TC egress program to {iface}"))?;
    if tcx {
        let path = links_dir(pin_dir).join(tc_pin_name(iface));
        pin_replacing(into_fd_link(prog.take_link(id)?)?, &path)?;
    }
    // Without tcx the attachment is a netlink filter owned by this process: it goes with it.
    Ok(())
}

pub fn attach_cgroup(ebpf: &mut Ebpf, pin_dir: &Path, cgroup_root: &Path) -> anyhow::Result<()> {
    let cgroup = File::open(cgroup_root)
        .with_context(|| format!("cannot open cgroup {}", cgroup_root.display()))?;
    for name in CGROUP_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        let id = prog
            // A link (kernel 5.7+) always coexists with others; link_create takes no flags.
            .attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach {name} to {}", cgroup_root.display()))?;
        let path = links_dir(pin_dir).join(name);
        pin_replacing(into_fd_link(prog.take_link(id)?)?, &path)?;
    }
    Ok(())
}

/// Attaches the sock_ops program at the cgroup root: every TCP connect on the node, as its
/// SYN goes out (see `circuit-ebpf`'s `sockops_connect`).
pub fn attach_sock_ops(ebpf: &mut Ebpf, pin_dir: &Path, cgroup_root: &Path) -> anyhow::Result<()> {
    let cgroup = File::open(cgroup_root)
        .with_context(|| format!("cannot open cgroup {}", cgroup_root.display()))?;
    let name = program_names::SOCKOPS_CONNECT;
    let prog: &mut SockOps = program(ebpf, name)?;
    prog.load()
        .with_context(|| format!("the kernel refused {name}"))?;
    let id = prog
        .attach(&cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("cannot attach {name} to {}", cgroup_root.display()))?;
    let path = links_dir(pin_dir).join(name);
    pin_replacing(into_fd_link(prog.take_link(id)?)?, &path)?;
    Ok(())
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// How long `remove_links` waits for the kernel to finish detaching.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes the pinned links and returns once the programs are detached from their hooks.
/// Each link is detached explicitly first: a link dropped by its last unpin is detached
/// later, in a kernel work item that frees the link's id before it detaches, so neither the
/// unpin nor the ids say when traffic stops seeing the program. Returns the paths removed.
pub fn remove_links(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = links_dir(pin_dir);
    if !super::mounts::owned_pin_dir(&dir)? {
        return Ok(Vec::new());
    }
    let pinned: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter(|e| is_link_pin(&e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    let ids: Vec<u32> = pinned
        .iter()
        .filter_map(|path| PinnedLink::from_pin(path).ok())
        .filter_map(|pinned| FdLink::from(pinned).info().ok())
        .map(|info| info.id())
        .collect();
    let mut all_detached = true;
    for path in &pinned {
        if let Err(err) = detach_pinned_link(path) {
            tracing::warn!(link = %path.display(), %err, "cannot detach the link on request; unpinning it");
            all_detached = false;
        }
    }
    let removed = super::remove_pinned_dir(&dir, is_link_pin)?;
    if all_detached {
        return Ok(removed);
    }
    // Best effort for a link the kernel would not detach on request: wait for its id to go,
    // which comes just before the kernel detaches it.
    let deadline = std::time::Instant::now() + DETACH_WAIT;
    while aya::programs::loaded_links()
        .filter_map(Result::ok)
        .any(|link| ids.contains(&link.id()))
    {
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "links unpinned, but the kernel still holds some after {DETACH_WAIT:?} (another process has them open?)"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(removed)
}

/// BPF_LINK_DETACH on the link pinned at `path`: its program leaves the hook before this
/// returns, whoever else still holds the link. (aya 0.14 does not wrap this command.)
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// The part of `union bpf_attr` that BPF_OBJ_GET reads. The padding is explicit: the
    /// kernel refuses (EINVAL) an attribute whose bytes past the command's last field are
    /// not zero, and implicit padding would pass whatever the stack held.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    /// The part of `union bpf_attr` that BPF_LINK_DETACH reads.
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let pathname = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let fd = bpf(
        BPF_OBJ_GET,
        &mut ObjGet {
            pathname: pathname.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        },
    )?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    bpf(
        BPF_LINK_DETACH,
        &mut LinkDetach {
            link_fd: link.as_raw_fd() as u32,
        },
    )?;
    Ok(())
}

/// The bpf(2) system call with `attr`, the leading part of `union bpf_attr` that `cmd` reads
/// (the kernel zero-fills the rest).
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed bpf_attr prefix of the given size, and
    // every pointer inside it is kept alive by the caller for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}
