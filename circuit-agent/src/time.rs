//! The real clock: the kernel's CLOCK_MONOTONIC, as `bpf_ktime_get_ns` reads it. The engine's
//! time types are re-exported so the agent has one place to take time from.

pub use circuit_engine::{Clock, ManualClock, MonoTime, saturating_nanos};

/// CLOCK_MONOTONIC: the same clock as the kernel programs' `bpf_ktime_get_ns`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    /// The kernel's monotonic time, as BPF programs read it (`bpf_ktime_get_ns`): inside a
    /// time namespace CLOCK_MONOTONIC is offset, and the offset is taken back out.
    fn now(&self) -> MonoTime {
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .expect("CLOCK_MONOTONIC is always available on Linux");
        let ns = ts.tv_sec() as i128 * 1_000_000_000 + ts.tv_nsec() as i128;
        MonoTime((ns - i128::from(time_namespace_offset_ns())).max(0) as u64)
    }
}

/// How far this process's time namespace moves CLOCK_MONOTONIC (0 outside one, and on
/// kernels without time namespaces), read once.
fn time_namespace_offset_ns() -> i64 {
    use std::os::unix::fs::MetadataExt;
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        // The file shows the offsets of the namespace this process's children get, which
        // is its own only when both links name one namespace (on 5.10, `unshare --time`
        // without a fork leaves the process itself outside).
        let ns = |link: &str| std::fs::metadata(link).ok().map(|m| (m.dev(), m.ino()));
        if ns("/proc/self/ns/time") != ns("/proc/self/ns/time_for_children") {
            return 0;
        }
        std::fs::read_to_string("/proc/self/timens_offsets")
            .ok()
            .and_then(|text| monotonic_offset_ns(&text))
            .unwrap_or(0)
    })
}

/// The monotonic line of /proc/PID/timens_offsets ("monotonic <secs> <nanos>"), in ns.
fn monotonic_offset_ns(text: &str) -> Option<i64> {
    let line = text.lines().find(|l| l.starts_with("monotonic"))?;
    let mut fields = line.split_whitespace().skip(1);
    let secs: i64 = fields.next()?.parse().ok()?;
    let nanos: i64 = fields.next()?.parse().ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    #[test]
    fn time_namespace_offsets_are_parsed() {
        let text = "monotonic      86400         5\nboottime          0         0\n";
        assert_eq!(super::monotonic_offset_ns(text), Some(86_400_000_000_005));
        assert_eq!(super::monotonic_offset_ns("boottime 1 0\n"), None);
    }
}
