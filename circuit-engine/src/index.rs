//! The upstream → slot index: an open-addressing hash table of bare slot numbers whose keys
//! live in the slots themselves.
//!
//! Each bucket is 8 bytes, a slot number and 32 bits of its upstream's hash: a lookup reads
//! one bucket (with linear probing, its neighbours share the cache line) and then the slot,
//! whose first cache line the caller is about to use anyway. A table with separate control
//! bytes (hashbrown) reads a control group and then the entry before the slot: one more
//! dependent load on every outcome.

use std::{hash::BuildHasher, net::SocketAddr};

use foldhash::fast::RandomState;

/// A slot number and the upper half of its upstream's hash, whose low bits are the
/// bucket where its probe starts.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tag: u32,
    slot: u32,
}

impl Bucket {
    const FREE: Bucket = Bucket {
        tag: 0,
        slot: u32::MAX,
    };

    fn is_free(self) -> bool {
        self.slot == u32::MAX
    }
}

#[derive(Default)]
pub struct SlotIndex {
    /// A power of two buckets, at most 7/8 in use (so every probe meets a free one), or none.
    buckets: Box<[Bucket]>,
    len: usize,
    /// foldhash (randomly seeded per process): this lookup is on every outcome, and
    /// SipHash is about half of the engine's cost per outcome.
    hasher: RandomState,
}

impl SlotIndex {
    /// The slot holding `upstream`; `key_of` reads an indexed slot's upstream.
    #[inline]
    pub fn get(&self, upstream: &SocketAddr, key_of: impl Fn(u32) -> SocketAddr) -> Option<u32> {
        let tag = tag(&self.hasher, upstream);
        let mask = self.mask();
        let mut position = tag as usize & mask;
        loop {
            let bucket = *self.buckets.get(position)?;
            if bucket.is_free() {
                return None;
            }
            if bucket.tag == tag && key_of(bucket.slot) == *upstream {
                return Some(bucket.slot);
            }
            position = (position + 1) & mask;
        }
    }

    /// Indexes slot `i`, which holds `upstream` (not indexed yet).
    pub fn insert(&mut self, upstream: &SocketAddr, i: u32) {
        debug_assert!(i != u32::MAX, "slot numbers stay below the free marker");
        if (self.len + 1) * 8 > self.buckets.len() * 7 {
            self.grow();
        }
        self.place(Bucket {
            tag: tag(&self.hasher, upstream),
            slot: i,
        });
        self.len += 1;
    }

    /// Drops slot `i`, which holds `upstream`, from the index.
    pub fn remove(&mut self, upstream: &SocketAddr, i: u32) {
        let tag = tag(&self.hasher, upstream);
        let Some(mut hole) = self
            .probe(tag)
            .take_while(|&position| !self.buckets[position].is_free())
            .find(|&position| self.buckets[position].slot == i)
        else {
            return;
        };
        // Backward-shift deletion: move each later bucket of the run into the hole if its
        // probe passes the hole, so that no probe ever stops short of its bucket.
        let mask = self.mask();
        let mut next = (hole + 1) & mask;
        while !self.buckets[next].is_free() {
            let home = self.buckets[next].tag as usize & mask;
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.buckets[hole] = self.buckets[next];
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.buckets[hole] = Bucket::FREE;
        self.len -= 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes of the table.
    pub fn heap_bytes(&self) -> usize {
        self.buckets.len() * Self::BYTES_PER_ENTRY
    }

    pub const BYTES_PER_ENTRY: usize = size_of::<Bucket>();

    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// The buckets a key with `tag` may be in, in probe order (none in an empty table).
    #[inline]
    fn probe(&self, tag: u32) -> impl Iterator<Item = usize> + use<> {
        let mask = self.mask();
        let start = tag as usize & mask;
        (0..self.buckets.len()).map(move |step| (start + step) & mask)
    }

    /// Puts `bucket` in the first free bucket of its probe.
    fn place(&mut self, bucket: Bucket) {
        let position = self
            .probe(bucket.tag)
            .find(|&position| self.buckets[position].is_free())
            .expect("the table always has a free bucket");
        self.buckets[position] = bucket;
    }

    fn grow(&mut self) {
        let buckets = (self.buckets.len() * 2).max(16);
        let old = std::mem::replace(&mut self.buckets, vec![Bucket::FREE; buckets].into());
        for bucket in old.iter().filter(|bucket| !bucket.is_free()) {
            self.place(*bucket);
        }
    }
}

/// The upper half of a hash of every part of the address that equality compares, packed
/// into as few words as possible: `SocketAddr`'s own `Hash` feeds the hasher field by
/// field, which costs several rounds per lookup.
#[inline]
fn tag(hasher: &RandomState, upstream: &SocketAddr) -> u32 {
    let hash = match upstream {
        SocketAddr::V4(v4) => {
            hasher.hash_one(u64::from(v4.ip().to_bits()) << 16 | u64::from(v4.port()))
        }
        SocketAddr::V6(v6) => hasher.hash_one((
            v6.ip().to_bits(),
            u64::from(v6.flowinfo()) << 32 | u64::from(v6.scope_id()),
            v6.port(),
        )),
    };
    (hash >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_is_indexed_through_growth_and_removals() {
        let addrs: Vec<SocketAddr> = (0..500u32)
            .map(|i| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 443)))
            .collect();
        let key_of = |i: u32| addrs[i as usize];
        let mut index = SlotIndex::default();
        assert_eq!(index.get(&addrs[0], key_of), None);
        for (i, addr) in addrs.iter().enumerate() {
            index.insert(addr, i as u32);
        }
        assert_eq!(index.len(), addrs.len());
        // Remove every third, then check every key, present or not.
        for i in (0..addrs.len()).step_by(3) {
            index.remove(&addrs[i], i as u32);
        }
        index.remove(&addrs[0], 0); // already gone
        for (i, addr) in addrs.iter().enumerate() {
            let expected = (i % 3 != 0).then_some(i as u32);
            assert_eq!(index.get(addr, key_of), expected, "{addr}");
        }
        assert_eq!(index.len(), addrs.len() - addrs.len().div_ceil(3));
        assert!(index.heap_bytes() * 7 >= index.len() * 8 * SlotIndex::BYTES_PER_ENTRY);
    }

    #[test]
    fn agrees_with_a_map_under_random_inserts_and_removals() {
        // Few keys in a table kept small: long runs that wrap around the end, so that the
        // backward-shift deletion is exercised in every position.
        let addrs: Vec<SocketAddr> = (0..40u16)
            .map(|i| SocketAddr::from(([192, 0, 2, 1], 1000 + i)))
            .collect();
        let key_of = |i: u32| addrs[i as usize];
        let mut index = SlotIndex::default();
        let mut model = std::collections::HashSet::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng % addrs.len() as u64) as u32;
            if model.contains(&i) {
                index.remove(&addrs[i as usize], i);
                model.remove(&i);
            } else {
                index.insert(&addrs[i as usize], i);
                model.insert(i);
            }
            assert_eq!(index.len(), model.len());
            for (j, addr) in addrs.iter().enumerate() {
                let expected = model.contains(&(j as u32)).then_some(j as u32);
                assert_eq!(index.get(addr, key_of), expected);
            }
        }
    }
}
