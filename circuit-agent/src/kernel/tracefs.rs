//! Tracepoint field offsets, read from tracefs `format` files.
//!
//! The layout of a tracepoint's record changes between kernel versions (fields are added,
//! e.g. `sock_cookie` in tcp_receive_reset), so the programs take offsets from here instead
//! of hard-coding one kernel's.

use std::{collections::HashMap, fs, path::Path};

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
pub struct Tracepoint {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    fields: &'static [&'static str],
    slot: fn(&mut TracepointLayout) -> &mut SockFieldOffsets,
}

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
    },
    Tracepoint {
        program: program_names::TP_RECEIVE_RESET,
        category: "tcp",
        name: "tcp_receive_reset",
        fields: &[
            "skaddr", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.receive_reset,
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
    },
    Tracepoint {
        program: program_names::TP_RETRANSMIT,
        category: "tcp",
        name: "tcp_retransmit_skb",
        fields: &[
            "skaddr", "state", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.retransmit,
    },
    Tracepoint {
        program: program_names::TP_DESTROY_SOCK,
        category: "tcp",
        name: "tcp_destroy_sock",
        fields: &[
            "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
        ],
        slot: |l| &mut l.destroy_sock,
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
/// expected means a layout this agent does not know, which is an error, not a guess.
fn sock_offsets(text: &str, wanted: &[&str]) -> anyhow::Result<SockFieldOffsets> {
    let fields = parse_format(text)?;
    let mut offsets = SockFieldOffsets::default();
    for name in wanted {
        let (_, size, slot) = FIELDS
            .iter()
            .find(|(n, ..)| n == name)
            .with_context(|| format!("no such tracepoint field `{name}` in circuit"))?;
        let field = fields
            .get(*name)
            .with_context(|| format!("field `{name}` is missing"))?;
        if field.size != *size {
            bail!("field `{name}` has size {}, expected {size}", field.size);
        }
        *slot(&mut offsets) = field.offset;
    }
    Ok(offsets)
}

fn read_format(tracefs: &Path, tp: &Tracepoint) -> anyhow::Result<String> {
    let path = tracefs
        .join("events")
        .join(tp.category)
        .join(tp.name)
        .join("format");
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads the layout of the tracepoints circuit attaches to from the tracefs at `tracefs`.
pub fn read_layout(tracefs: &Path) -> anyhow::Result<TracepointLayout> {
    let mut layout = TracepointLayout::default();
    for tp in &TRACEPOINTS {
        let text = read_format(tracefs, tp)?;
        *(tp.slot)(&mut layout) = sock_offsets(&text, tp.fields)
            .with_context(|| format!("unexpected layout of {}:{}", tp.category, tp.name))?;
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

    #[test]
    fn reads_this_kernels_tracefs_when_mounted() {
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("events").exists() {
            return; // unprivileged or tracefs not mounted: covered by the kernel tests
        }
        let layout = read_layout(tracefs).unwrap();
        assert_ne!(layout.set_state.newstate, 0);
        assert_ne!(layout.receive_reset.daddr, 0);
        assert_ne!(layout.error_report.error, 0);
        assert_ne!(layout.retransmit.state, 0);
        assert_ne!(layout.destroy_sock.daddr, 0);
    }
}
