//! The upstream → slot index: a hash table of bare slot numbers whose keys live in the
//! slots themselves.
//!
//! Each entry is 4 bytes instead of a 36-byte (address, slot) pair: the table stays small
//! enough to be cached, and the key comparison reads the slot's first cache line, which
//! the caller is about to use anyway.

use std::{hash::BuildHasher, net::SocketAddr};

use foldhash::fast::RandomState;
use hashbrown::HashTable;

#[derive(Default)]
pub struct SlotIndex {
    table: HashTable<u32>,
    /// foldhash (randomly seeded per process): this lookup is on every outcome, and
    /// SipHash is about half of the engine's cost per outcome.
    hasher: RandomState,
}

impl SlotIndex {
    /// The slot holding `upstream`; `key_of` reads an indexed slot's upstream.
    #[inline]
    pub fn get(&self, upstream: &SocketAddr, key_of: impl Fn(u32) -> SocketAddr) -> Option<u32> {
        self.table
            .find(hash(&self.hasher, upstream), |&i| key_of(i) == *upstream)
            .copied()
    }

    /// Indexes slot `i`, which holds `upstream` (not indexed yet).
    pub fn insert(&mut self, upstream: &SocketAddr, i: u32, key_of: impl Fn(u32) -> SocketAddr) {
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash(hasher, upstream), i, |&j| hash(hasher, &key_of(j)));
    }

    /// Drops slot `i`, which holds `upstream`, from the index.
    pub fn remove(&mut self, upstream: &SocketAddr, i: u32) {
        let hash = hash(&self.hasher, upstream);
        if let Ok(entry) = self.table.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Heap bytes of the table: a control byte per bucket besides the entry.
    pub fn heap_bytes(&self) -> usize {
        self.table.capacity() * Self::BYTES_PER_ENTRY
    }

    pub const BYTES_PER_ENTRY: usize = size_of::<u32>() + 1;
}

/// Hashes every part of the address that equality compares, packed into as few words
/// as possible: `SocketAddr`'s own `Hash` feeds the hasher field by field, which costs
/// several rounds per lookup.
#[inline]
fn hash(hasher: &RandomState, upstream: &SocketAddr) -> u64 {
    match upstream {
        SocketAddr::V4(v4) => {
            hasher.hash_one(u64::from(v4.ip().to_bits()) << 16 | u64::from(v4.port()))
        }
        SocketAddr::V6(v6) => hasher.hash_one((
            v6.ip().to_bits(),
            u64::from(v6.flowinfo()) << 32 | u64::from(v6.scope_id()),
            v6.port(),
        )),
    }
}
