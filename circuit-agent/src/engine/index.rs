//! The upstream → slot index: a hash table of bare slot numbers whose keys live in the
//! slots themselves.
//!
//! Each entry is 4 bytes instead of a 36-byte (address, slot) pair: the table stays small
//! enough to be cached, and the key comparison reads the slot's first cache line, which
//! the caller is about to use anyway.

use std::{hash::BuildHasher, net::SocketAddr};

use hashbrown::HashTable;

#[derive(Default)]
pub struct SlotIndex {
    table: HashTable<u32>,
    /// foldhash (randomly seeded per process): this lookup is on every outcome, and
    /// SipHash is about half of the engine's cost per outcome.
    hasher: foldhash::fast::RandomState,
}

impl SlotIndex {
    /// The slot holding `upstream`; `key_of` reads an indexed slot's upstream.
    #[inline]
    pub fn get(&self, upstream: &SocketAddr, key_of: impl Fn(u32) -> SocketAddr) -> Option<u32> {
        let hash = self.hasher.hash_one(upstream);
        self.table.find(hash, |&i| key_of(i) == *upstream).copied()
    }

    /// Indexes slot `i`, which holds `upstream` (not indexed yet).
    pub fn insert(&mut self, upstream: &SocketAddr, i: u32, key_of: impl Fn(u32) -> SocketAddr) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(upstream);
        self.table
            .insert_unique(hash, i, |&j| hasher.hash_one(key_of(j)));
    }

    /// Drops slot `i`, which holds `upstream`, from the index.
    pub fn remove(&mut self, upstream: &SocketAddr, i: u32) {
        let hash = self.hasher.hash_one(upstream);
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
