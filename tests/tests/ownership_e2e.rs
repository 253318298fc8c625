//! The agent touches only what is its own. The bpffs root is world-writable (sticky), so an
//! unprivileged user can plant a symlink or a directory where a pin directory will be:
//! circuit follows no symlink, uses only directories that root owns and nobody else can
//! write, and `detach` removes only circuit's pins, by name. Links an earlier configuration
//! pinned and this one no longer wants are detached, not left enforcing.

mod common;

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use circuit_tests::{NetNs, RemoveOnDrop, agent_binary, require_root, unique_name};
use common::{Scenario, Setup};
use nix::sys::signal::Signal;

const NOBODY: u32 = 65_534;

fn bpffs_path(prefix: &str) -> RemoveOnDrop {
    RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name(prefix)))
}

/// A directory in /tmp holding a file nobody should lose.
fn victim() -> (RemoveOnDrop, PathBuf) {
    let dir = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbvictim")));
    std::fs::create_dir(&dir.0).unwrap();
    let file = dir.0.join("precious");
    std::fs::write(&file, "root's data").unwrap();
    (dir, file)
}

fn as_nobody(program: &str, args: &[&std::ffi::OsStr]) {
    let status = Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .status()
        .unwrap();
    assert!(status.success(), "{program} {args:?} as nobody");
}

fn agent(args: &[&str], pin_dir: &Path) -> Output {
    Command::new(agent_binary().unwrap())
        .args(args)
        .arg("--pin-dir")
        .arg(pin_dir)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn detach_follows_no_symlink_planted_in_the_bpffs_root() {
    require_root().unwrap();
    let (_victim, file) = victim();
    let link = bpffs_path("cbsym");
    as_nobody(
        "ln",
        &[
            "-s".as_ref(),
            file.parent().unwrap().as_os_str(),
            link.0.as_os_str(),
        ],
    );
    let out = agent(&["detach"], &link.0);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is a symlink"), "{}", stderr(&out));
    assert!(file.exists(), "root's file is still there");
}

#[test]
fn detach_refuses_a_directory_that_is_not_on_bpffs() {
    require_root().unwrap();
    let (victim, file) = victim();
    std::fs::set_permissions(&victim.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = agent(&["detach"], &victim.0);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not on a bpffs"), "{}", stderr(&out));
    assert!(file.exists());
}

#[test]
fn a_pin_directory_made_by_another_user_is_refused() {
    require_root().unwrap();
    let dir = bpffs_path("cbnobody");
    as_nobody("mkdir", &[dir.0.as_os_str()]);
    for verb in [&["detach"][..], &["attach", "--enforce", "cgroup"][..]] {
        let out = agent(verb, &dir.0);
        assert_eq!(out.status.code(), Some(1), "{verb:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("owned by uid 65534"),
            "{verb:?}: {}",
            stderr(&out)
        );
    }
    assert!(dir.0.is_dir(), "left as it was");
}

/// circuit's pins go; whatever else is in the directory stays and is named.
#[test]
fn detach_removes_only_circuits_own_pins() {
    let mut s = Scenario::start(Setup::default());
    s.stop_agent(Signal::SIGTERM);
    let foreign = s.pins.0.join("someone_elses_map");
    std::fs::hard_link(s.pins.0.join(circuit_common::map_names::STATS), &foreign)
        .or_else(|_| {
            // bpffs has no hard links: pin the same map again under another name.
            let map = aya::maps::MapData::from_pin(s.pins.0.join(circuit_common::map_names::STATS))
                .unwrap();
            map.pin(&foreign).map_err(std::io::Error::other)
        })
        .unwrap();
    let out = agent(&["detach"], &s.pins.0);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("someone_elses_map"),
        "{}",
        stderr(&out)
    );
    assert!(foreign.exists());
    assert!(!s.pins.0.join(circuit_common::map_names::VERDICTS).exists());
    assert!(!s.pins.0.join("links").exists(), "the links went first");
}

/// Restarted with fewer enforcement points, the agent detaches the links it no longer
/// wants instead of leaving the earlier run's programs enforcing.
#[test]
fn links_the_configuration_no_longer_wants_are_detached() {
    let mut s = Scenario::start(Setup {
        enforce: "xdp,tc",
        ..Setup::default()
    });
    let links = s.pins.0.join("links");
    let iface = s.sandbox.upstream_if.clone();
    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let tcx = names(&links).contains(&format!("tc_{iface}"));
    s.stop_agent(Signal::SIGTERM);
    s.restart_enforcing("xdp");
    if tcx {
        s.agent()
            .wait_for_lines(
                &["detached a pinned link", &format!("tc_{iface}")],
                1,
                Duration::from_secs(5),
            )
            .unwrap();
    }
    assert!(!names(&links).contains(&format!("tc_{iface}")));
    assert!(names(&links).contains(&format!("xdp_{iface}")));
    s.stop_agent(Signal::SIGTERM);
    s.restart_enforcing("tc");
    assert!(!names(&links).contains(&format!("xdp_{iface}")));
    // No XDP program is left on the interface.
    let out = s
        .sandbox
        .upstream
        .command("ip")
        .unwrap()
        .args(["-d", "link", "show", &iface])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("prog/xdp"), "{text}");
}

/// `ip netns exec` gives the agent a private /sys without bpffs: pins made there would
/// vanish with it, so it refuses to start and names the way that works.
#[test]
fn an_agent_without_the_hosts_bpffs_refuses_to_start() {
    require_root().unwrap();
    let ns = NetNs::create(&unique_name("cbmnt")).unwrap();
    let pins = bpffs_path("cbprivate");
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(agent_binary().unwrap())
        .args(["attach", "--enforce", "xdp", "--iface", "lo", "--pin-dir"])
        .arg(&pins.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("nsenter --net"), "{}", stderr(&out));
    assert!(!pins.0.exists());
}
