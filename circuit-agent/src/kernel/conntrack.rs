//! Where conntrack keeps a connection's tuples, read from the kernel's BTF: the layout of
//! `struct sk_buff` and `struct nf_conn` depends on the kernel's version and configuration
//! (lock debugging, zones, ...), so nothing is hard-coded. nf_conntrack may be built in
//! (its types are in vmlinux's BTF) or a module (its own split BTF, on 5.11+ kernels built
//! with module BTF).

use std::path::Path;

use btf_rs::{Btf, Type};
use circuit_common::{ConntrackLayout, conntrack_tuple};

const BTF_DIR: &str = "/sys/kernel/btf";

/// Where conntrack keeps a connection's tuples on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conntrack {
    pub offsets: ConntrackLayout,
}

/// The layout on the running kernel, or why service resolution cannot work here.
pub fn running_layout() -> Result<Conntrack, String> {
    layout_in(Path::new(BTF_DIR))
}

fn layout_in(dir: &Path) -> Result<Conntrack, String> {
    let vmlinux = Btf::from_file(dir.join("vmlinux")).map_err(|e| {
        format!("the kernel has no readable BTF ({e}): needs CONFIG_DEBUG_INFO_BTF")
    })?;
    let skb_nfct = member_offset(&vmlinux, "sk_buff", "_nfct")
        .map_err(|e| format!("{e}: the kernel is built without conntrack (CONFIG_NF_CONNTRACK)"))?;
    let module;
    // btf-rs answers an unknown name with an empty list, not an error. Built in, its types
    // are vmlinux's; a module has its own (split) BTF.
    let conntrack = if find_struct(&vmlinux, "nf_conn").is_ok() {
        &vmlinux
    } else {
        let path = dir.join("nf_conntrack");
        if !path.exists() {
            return Err(
                "nf_conntrack is not loaded (or its module has no BTF, Linux 5.11+): no NAT to resolve"
                    .to_owned(),
            );
        }
        module = Btf::from_split_file(&path, &vmlinux)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        &module
    };
    let layout = ConntrackLayout {
        skb_nfct,
        ct_tuplehash: member_offset(conntrack, "nf_conn", "tuplehash")?,
        tuplehash_size: struct_size(conntrack, "nf_conntrack_tuple_hash")?,
        tuple: member_offset(conntrack, "nf_conntrack_tuple_hash", "tuple")?,
    };
    let tuple_size = struct_size(conntrack, "nf_conntrack_tuple")?;
    if tuple_size as usize != conntrack_tuple::SIZE {
        return Err(format!(
            "struct nf_conntrack_tuple is {tuple_size} bytes here, not the {} circuit reads",
            conntrack_tuple::SIZE
        ));
    }
    Ok(Conntrack { offsets: layout })
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct, String> {
    btf.resolve_types_by_name(name)
        .ok()
        .into_iter()
        .flatten()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct {name} in the kernel's BTF"))
}

fn struct_size(btf: &Btf, name: &str) -> Result<u32, String> {
    Ok(find_struct(btf, name)?.size() as u32)
}

/// The byte offset of `member` in struct `name`, looking into anonymous structs and unions.
fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32, String> {
    let s = find_struct(btf, name)?;
    offset_in(btf, &s, member)
        .map(|bits| bits / 8)
        .ok_or_else(|| format!("struct {name} has no member {member} in the kernel's BTF"))
}

fn offset_in(btf: &Btf, s: &btf_rs::Struct, wanted: &str) -> Option<u32> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == wanted {
            return Some(m.bit_offset());
        }
        if name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(bits) = offset_in(btf, &inner, wanted)
        {
            return Some(m.bit_offset() + bits);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build machine's kernel: its BTF must give a layout (this kernel has conntrack
    /// built in or loaded whenever NAT tests run). Checked against what every kernel since
    /// 2.6 has: the tuple sits after the hash-list node in its tuple hash.
    #[test]
    fn the_running_kernel_has_a_conntrack_layout() {
        if !Path::new(BTF_DIR).join("vmlinux").exists() {
            panic!("no {BTF_DIR}/vmlinux: circuit needs a kernel with BTF");
        }
        match running_layout() {
            Ok(Conntrack { offsets: layout }) => {
                assert!(layout.is_set(), "{layout:?}");
                assert_eq!(layout.tuple, 16, "after struct hlist_nulls_node");
                assert_eq!(layout.tuplehash_size, 56, "{layout:?}");
                assert!(layout.skb_nfct > 0 && layout.ct_tuplehash > 0);
            }
            Err(why) => assert!(why.contains("nf_conntrack is not loaded"), "{why}"),
        }
    }

    #[test]
    fn a_directory_without_btf_says_so() {
        let err = layout_in(Path::new("/nonexistent")).unwrap_err();
        assert!(err.contains("BTF"), "{err}");
    }
}
