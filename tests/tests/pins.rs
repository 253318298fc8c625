//! Maps pinned by another version (or anyone else) are checked before they are reused: a
//! stale bookkeeping map is replaced, a stale verdict map stops the load with a clear error.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya::maps::MapData;
use circuit_agent::kernel::ProgramsUnderTest;
use circuit_common::{Stat, map_names};
use circuit_tests::{RemoveOnDrop, require_root, unique_name};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Pins a new, empty map of the given shape at `path`, as another program might have.
fn pin_map(path: &Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    // Before 5.11 a map's memory is charged to RLIMIT_MEMLOCK, which is small by default.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let mut create = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
    };
    // SAFETY: a bpf_attr prefix of the size given, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut create as *mut MapCreate,
            size_of::<MapCreate>(),
        )
    };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut pin = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: as above; `name` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &mut pin as *mut ObjPin,
            size_of::<ObjPin>(),
        )
    };
    assert_eq!(rc, 0, "pin: {}", std::io::Error::last_os_error());
}

fn pins() -> RemoveOnDrop {
    require_root().unwrap();
    let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbpins")));
    std::fs::create_dir_all(&pins.0).unwrap();
    pins
}

#[test]
fn a_stale_bookkeeping_map_is_replaced_by_a_fresh_one() {
    let pins = pins();
    // The counters as an agent with one counter fewer pinned them, and an LRU map of another
    // value size under the in-flight connections' name.
    let stats = pins.0.join(map_names::STATS);
    pin_map(&stats, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, Stat::COUNT - 1);
    let old_syn_sent = 16;
    pin_map(
        &pins.0.join(map_names::SYN_SENT),
        BPF_MAP_TYPE_LRU_HASH,
        8,
        old_syn_sent,
        16,
    );
    let programs = ProgramsUnderTest::load(&pins.0).unwrap();
    let info = MapData::from_pin(&stats).unwrap().info().unwrap();
    assert_eq!(info.max_entries(), Stat::COUNT);
    let info = MapData::from_pin(pins.0.join(map_names::SYN_SENT))
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(
        info.value_size(),
        size_of::<circuit_common::SynSent>() as u32
    );
    drop(programs);
}

#[test]
fn a_map_of_another_shape_pinned_as_the_verdicts_stops_the_load() {
    let pins = pins();
    // F10 of the adversarial review: an LRU map planted under the verdicts' name.
    pin_map(
        &pins.0.join(map_names::VERDICTS),
        BPF_MAP_TYPE_LRU_HASH,
        20,
        24,
        16,
    );
    let err = ProgramsUnderTest::load(&pins.0).err().expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("is not the map this agent needs") && text.contains("detach"),
        "{text}"
    );
    // Nothing was replaced behind the operator's back.
    let info = MapData::from_pin(pins.0.join(map_names::VERDICTS))
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(info.max_entries(), 16);
    // A hash map of the right shape is taken as it is.
    let pins = self::pins();
    pin_map(
        &pins.0.join(map_names::VERDICTS),
        BPF_MAP_TYPE_HASH,
        20,
        24,
        circuit_common::VERDICTS_CAPACITY,
    );
    ProgramsUnderTest::load(&pins.0).unwrap();
}
