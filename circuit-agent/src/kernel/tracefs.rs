//! Tracepoint field offsets, read from tracefs `format` files.
//!
//! The layout of a tracepoint's record changes between kernel versions (fields are added,
//! e.g. `sock_cookie` in tcp_receive_reset), so the programs take offsets from here instead
//! of hard-coding one kernel's.

use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context, bail};
use circuit_common::{SockFieldOffsets, TracepointLayout};

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

/// Looks up `name` and checks its size: a different size means a layout we do not know.
fn offset(fields: &HashMap<String, Field>, name: &str, size: u16) -> anyhow::Result<u16> {
    let field = fields
        .get(name)
        .with_context(|| format!("field `{name}` is missing"))?;
    if field.size != size {
        bail!("field `{name}` has size {}, expected {size}", field.size);
    }
    Ok(field.offset)
}

fn sock_offsets(text: &str, with_state: bool) -> anyhow::Result<SockFieldOffsets> {
    let f = parse_format(text)?;
    let (oldstate, newstate, protocol) = if with_state {
        (
            offset(&f, "oldstate", 4)?,
            offset(&f, "newstate", 4)?,
            offset(&f, "protocol", 2)?,
        )
    } else {
        (0, 0, 0)
    };
    Ok(SockFieldOffsets {
        skaddr: offset(&f, "skaddr", 8)?,
        oldstate,
        newstate,
        sport: offset(&f, "sport", 2)?,
        dport: offset(&f, "dport", 2)?,
        family: offset(&f, "family", 2)?,
        protocol,
        saddr: offset(&f, "saddr", 4)?,
        daddr: offset(&f, "daddr", 4)?,
        saddr_v6: offset(&f, "saddr_v6", 16)?,
        daddr_v6: offset(&f, "daddr_v6", 16)?,
        _pad: 0,
    })
}

fn read_format(tracefs: &Path, category: &str, name: &str) -> anyhow::Result<String> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads the layout of the tracepoints circuit attaches to from the tracefs at `tracefs`.
pub fn read_layout(tracefs: &Path) -> anyhow::Result<TracepointLayout> {
    let set_state = read_format(tracefs, "sock", "inet_sock_set_state")?;
    let receive_reset = read_format(tracefs, "tcp", "tcp_receive_reset")?;
    Ok(TracepointLayout {
        set_state: sock_offsets(&set_state, true)
            .context("unexpected layout of sock:inet_sock_set_state")?,
        receive_reset: sock_offsets(&receive_reset, false)
            .context("unexpected layout of tcp:tcp_receive_reset")?,
    })
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
        let o = sock_offsets(SET_STATE_6_18, true).unwrap();
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
        let o = sock_offsets(RECEIVE_RESET_SHIFTED, false).unwrap();
        assert_eq!((o.skaddr, o.sport, o.daddr, o.daddr_v6), (16, 24, 34, 54));
    }

    #[test]
    fn missing_or_resized_fields_are_errors() {
        let missing = SET_STATE_6_18.replace("field:int newstate", "field:int other");
        let err = sock_offsets(&missing, true).unwrap_err().to_string();
        assert!(err.contains("newstate"), "{err}");
        let resized = SET_STATE_6_18.replace("offset:26;\tsize:2", "offset:26;\tsize:4");
        let err = sock_offsets(&resized, true).unwrap_err().to_string();
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
    }
}
