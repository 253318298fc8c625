//! Tracepoint field offsets, read from tracefs `format` files.
//!
//! The layout of a tracepoint's record changes between kernel versions (fields are added,
//! e.g. `sock_cookie` in tcp_receive_reset), so the programs take offsets from here instead
//! of hard-coding one kernel's.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use circuit_common::{SockFieldOffsets, TracepointLayout, program_names};

/// One `field:` line of a format file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    offset: u16,
    size: u16,
}

/// Parses the `field:` lines of a tracepoint format file into name → (offset, size).
/// Array fields (`__u8 saddr[4]`) are keyed by their bare name.
fn parse_format(text: &str) -> anyhow::Result<HashMap<String, Field>> {
    let mut fields = HashMap::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("field:"))
    {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.split(';').map(str::trim) {
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(
                    v.parse::<u16>()
                        .with_context(|| format!("bad offset in {line:?}"))?,
                );
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(
                    v.parse::<u16>()
                        .with_context(|| format!("bad size in {line:?}"))?,
                );
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            bail!("malformed field line {line:?}");
        };
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_owned(), Field { offset, size });
    }
    Ok(fields)
}

/// A tracepoint circuit attaches to: its program, where it lives, and the fields it reads.
#[derive(Debug)]
pub struct Tracepoint {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    fields: &'static [&'static str],
    slot: fn(&mut TracepointLayout) -> &mut SockFieldOffsets,
    /// The first kernel that has it.
    pub since: &'static str,
    /// What is lost where the kernel lacks it; None: the agent cannot work without it.
    pub without: Option<&'static str>,
}

/// Fields the programs can do without (see [`SockFieldOffsets::ABSENT`]), with the first
/// kernel whose tracepoints all have them and what their absence costs.
pub const OPTIONAL_FIELDS: [(&str, &str, &str); 1] = [(
    "family",
    "5.11",
    "addresses are read from the IPv6 fields, where IPv4 ones are v4-mapped: nothing lost",
)];

pub const TRACEPOINTS: [Tracepoint; 5] = [
    Tracepoint {
        program: program_names::TP_SET_STATE,
        category: "sock",
        name: "inet_sock_set_state",
        fields: &[
            "skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol", "saddr",
            "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.set_state,
        since: "4.16",
        without: None,
    },
    Tracepoint {
        program: program_names::TP_RECEIVE_RESET,
        category: "tcp",
        name: "tcp_receive_reset",
        fields: &[
            "skaddr", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.receive_reset,
        since: "4.15",
        without: None,
    },
    Tracepoint {
        program: program_names::TP_ERROR_REPORT,
        category: "sock",
        name: "inet_sk_error_report",
        fields: &[
            "error", "sport", "dport", "family", "protocol", "saddr", "daddr", "saddr_v6",
            "daddr_v6",
        ],
        slot: |l| &mut l.error_report,
        since: "5.15",
        without: Some(
            "a failed connect is classified when its socket is destroyed, as aborted after however long it waited: it counts as a failure when it waited long (see abort_min_wait), whatever the error (ICMP refusals and unreachable included)",
        ),
    },
    Tracepoint {
        program: program_names::TP_RETRANSMIT,
        category: "tcp",
        name: "tcp_retransmit_skb",
        fields: &[
            "skaddr", "state", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.retransmit,
        since: "4.15",
        without: None,
    },
    Tracepoint {
        program: program_names::TP_DESTROY_SOCK,
        category: "tcp",
        name: "tcp_destroy_sock",
        fields: &[
            "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.destroy_sock,
        since: "4.15",
        without: None,
    },
];

/// Where a field's offset goes in [`SockFieldOffsets`].
type OffsetSlot = fn(&mut SockFieldOffsets) -> &mut u16;

/// Every field the programs may read: its size in the record, and where its offset goes.
const FIELDS: [(&str, u16, OffsetSlot); 13] = [
    ("skaddr", 8, |o| &mut o.skaddr),
    ("oldstate", 4, |o| &mut o.oldstate),
    ("newstate", 4, |o| &mut o.newstate),
    ("state", 4, |o| &mut o.state),
    ("error", 4, |o| &mut o.error),
    ("sport", 2, |o| &mut o.sport),
    ("dport", 2, |o| &mut o.dport),
    ("family", 2, |o| &mut o.family),
    ("protocol", 2, |o| &mut o.protocol),
    ("saddr", 4, |o| &mut o.saddr),
    ("daddr", 4, |o| &mut o.daddr),
    ("saddr_v6", 16, |o| &mut o.saddr_v6),
    ("daddr_v6", 16, |o| &mut o.daddr_v6),
];

/// The offsets of `wanted` fields in a format file; a field missing or of another size than
/// expected means a layout this agent does not know, which is an error, not a guess, unless
/// the field is one of the [`OPTIONAL_FIELDS`] (then its offset is `ABSENT`).
fn sock_offsets(text: &str, wanted: &[&str]) -> anyhow::Result<SockFieldOffsets> {
    let fields = parse_format(text)?;
    let mut offsets = SockFieldOffsets::default();
    for name in wanted {
        let (_, size, slot) = FIELDS
            .iter()
            .find(|(n, ..)| n == name)
            .with_context(|| format!("no such tracepoint field `{name}` in circuit"))?;
        let Some(field) = fields.get(*name) else {
            if OPTIONAL_FIELDS.iter().any(|(n, ..)| n == name) {
                *slot(&mut offsets) = SockFieldOffsets::ABSENT;
                continue;
            }
            bail!("field `{name}` is missing");
        };
        if field.size != *size {
            bail!("field `{name}` has size {}, expected {size}", field.size);
        }
        *slot(&mut offsets) = field.offset;
    }
    Ok(offsets)
}

fn format_path(tracefs: &Path, tp: &Tracepoint) -> PathBuf {
    tracefs
        .join("events")
        .join(tp.category)
        .join(tp.name)
        .join("format")
}

/// The tracepoints' layout on this kernel, and what it lacks.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub offsets: TracepointLayout,
    /// Tracepoints this kernel does not have (only ones the agent can do without).
    pub missing: Vec<&'static Tracepoint>,
    /// Optional fields absent from a tracepoint: (tracepoint, field).
    pub absent_fields: Vec<(&'static Tracepoint, &'static str)>,
}

impl Layout {
    pub fn has(&self, tp: &Tracepoint) -> bool {
        !self.missing.iter().any(|m| m.program == tp.program)
    }
}

/// Reads the layout of the tracepoints circuit attaches to from the tracefs at `tracefs`.
/// A missing tracepoint is an error unless the agent can do without it.
pub fn read_layout(tracefs: &Path) -> anyhow::Result<Layout> {
    let mut layout = Layout::default();
    for tp in &TRACEPOINTS {
        let path = format_path(tracefs, tp);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tp.without.is_some() => {
                layout.missing.push(tp);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "this kernel has no tracepoint {}:{} (needs Linux {} or newer; {} not found)",
                    tp.category,
                    tp.name,
                    tp.since,
                    path.display()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let offsets = sock_offsets(&text, tp.fields)
            .with_context(|| format!("unexpected layout of {}:{}", tp.category, tp.name))?;
        for (name, ..) in OPTIONAL_FIELDS {
            let mut read = offsets;
            let slot = FIELDS.iter().find(|(n, ..)| *n == name).map(|f| f.2);
            if tp.fields.contains(&name)
                && slot.is_some_and(|s| *s(&mut read) == SockFieldOffsets::ABSENT)
            {
                layout.absent_fields.push((tp, name));
            }
        }
        *(tp.slot)(&mut layout.offsets) = offsets;
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Linux 6.18's format files, verbatim.
    const SET_STATE_6_18: &str = "name: inet_sock_set_state
ID: 1523
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;

print fmt: \"family=%s\"
";

    // An older layout (Linux 5.x, before sock_cookie), where the offsets are the same as
    // today for these fields; shifted here to prove nothing is hard-coded.
    const RECEIVE_RESET_SHIFTED: &str = "format:
	field:const void * skaddr;	offset:16;	size:8;	signed:0;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:30;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:34;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:38;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:54;	size:16;	signed:0;
";

    #[test]
    fn parses_the_set_state_format() {
        let o = sock_offsets(SET_STATE_6_18, TRACEPOINTS[0].fields).unwrap();
        assert_eq!(
            (
                o.skaddr, o.oldstate, o.newstate, o.sport, o.dport, o.family, o.protocol
            ),
            (8, 16, 20, 24, 26, 28, 30)
        );
        assert_eq!((o.saddr, o.daddr, o.saddr_v6, o.daddr_v6), (32, 36, 40, 56));
    }

    #[test]
    fn follows_the_offsets_it_is_given() {
        let o = sock_offsets(RECEIVE_RESET_SHIFTED, TRACEPOINTS[1].fields).unwrap();
        assert_eq!((o.skaddr, o.sport, o.daddr, o.daddr_v6), (16, 24, 34, 54));
    }

    #[test]
    fn missing_or_resized_fields_are_errors() {
        let missing = SET_STATE_6_18.replace("field:int newstate", "field:int other");
        let err = sock_offsets(&missing, TRACEPOINTS[0].fields)
            .unwrap_err()
            .to_string();
        assert!(err.contains("newstate"), "{err}");
        let resized = SET_STATE_6_18.replace("offset:26;\tsize:2", "offset:26;\tsize:4");
        let err = sock_offsets(&resized, TRACEPOINTS[0].fields)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dport") && err.contains("size 4"), "{err}");
    }

    // Linux 5.10.262's (Debian 11), verbatim but for the common fields: no `family`.
    const RECEIVE_RESET_5_10: &str = "name: tcp_receive_reset
format:
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:__u16 sport;	offset:16;	size:2;	signed:0;
	field:__u16 dport;	offset:18;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:20;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:24;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:28;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:44;	size:16;	signed:0;
	field:__u64 sock_cookie;	offset:64;	size:8;	signed:0;
";

    #[test]
    fn a_missing_family_is_absent_not_an_error() {
        let o = sock_offsets(RECEIVE_RESET_5_10, TRACEPOINTS[1].fields).unwrap();
        assert_eq!(o.family, SockFieldOffsets::ABSENT);
        assert_eq!((o.skaddr, o.daddr_v6), (8, 44));
    }

    /// A tracefs tree with the given tracepoints' format files.
    fn fake_tracefs(formats: &[(&Tracepoint, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "circuit-tracefs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&root);
        for (tp, text) in formats {
            let path = format_path(&root, tp);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        root
    }

    #[test]
    fn a_kernel_without_the_error_report_degrades_and_says_so() {
        let [set_state, reset, report, retransmit, destroy] = &TRACEPOINTS;
        let root = fake_tracefs(&[
            (set_state, SET_STATE_6_18),
            (reset, RECEIVE_RESET_5_10),
            (retransmit, RECEIVE_RESET_5_10),
            (destroy, RECEIVE_RESET_5_10),
        ]);
        let result = read_layout(&root);
        // The retransmit format lacks `state`: a required field.
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("tcp_retransmit_skb") && err.contains("state"),
            "{err}"
        );
        let retransmit_5_10 = RECEIVE_RESET_5_10.replace(
            "\tfield:__u16 sport;",
            "\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:__u16 sport;",
        );
        fs::write(format_path(&root, retransmit), retransmit_5_10).unwrap();
        let layout = read_layout(&root).unwrap();
        assert_eq!(layout.missing.len(), 1);
        assert_eq!(layout.missing[0].name, report.name);
        assert!(!layout.has(report) && layout.has(reset));
        let absent: Vec<_> = layout
            .absent_fields
            .iter()
            .map(|(tp, f)| (tp.name, *f))
            .collect();
        assert_eq!(
            absent,
            [
                ("tcp_receive_reset", "family"),
                ("tcp_retransmit_skb", "family"),
                ("tcp_destroy_sock", "family")
            ]
        );
        // A required tracepoint missing is an error that names the kernel it needs.
        fs::remove_file(format_path(&root, destroy)).unwrap();
        let err = format!("{:#}", read_layout(&root).unwrap_err());
        assert!(
            err.contains("tcp:tcp_destroy_sock") && err.contains("4.15"),
            "{err}"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn reads_this_kernels_tracefs_when_mounted() {
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("events").exists() {
            return; // unprivileged or tracefs not mounted: covered by the kernel tests
        }
        let layout = read_layout(tracefs).unwrap().offsets;
        assert_ne!(layout.set_state.newstate, 0);
        assert_ne!(layout.receive_reset.daddr, 0);
        assert_ne!(layout.error_report.error, 0);
        assert_ne!(layout.retransmit.state, 0);
        assert_ne!(layout.destroy_sock.daddr, 0);
    }
}
