//! An intrusive least-recently-used list over slot numbers: O(1) touch, insert, remove and
//! oldest, no allocation once the slots exist.

use crate::time::MonoTime;

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Links {
    newer: u32,
    older: u32,
    linked: bool,
    /// When the slot was last touched (or linked).
    stamp: MonoTime,
}

const UNLINKED: Links = Links {
    newer: NONE,
    older: NONE,
    linked: false,
    stamp: MonoTime(0),
};

#[derive(Clone, Debug)]
pub struct LruList {
    links: Vec<Links>,
    newest: u32,
    oldest: u32,
}

impl Default for LruList {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            newest: NONE,
            oldest: NONE,
        }
    }
}

impl LruList {
    /// Memory the list needs per slot.
    pub const BYTES_PER_SLOT: usize = size_of::<Links>();

    pub fn is_linked(&self, slot: u32) -> bool {
        self.links.get(slot as usize).is_some_and(|l| l.linked)
    }

    /// Links `slot` as the newest entry.
    pub fn push_newest(&mut self, slot: u32, now: MonoTime) {
        let i = slot as usize;
        if self.links.len() <= i {
            self.links.resize(i + 1, UNLINKED);
        }
        debug_assert!(!self.links[i].linked, "slot {slot} is already linked");
        self.links[i] = Links {
            newer: NONE,
            older: self.newest,
            linked: true,
            stamp: now,
        };
        match self.newest {
            NONE => self.oldest = slot,
            newest => self.links[newest as usize].newer = slot,
        }
        self.newest = slot;
    }

    pub fn remove(&mut self, slot: u32) {
        let Links {
            newer,
            older,
            linked,
            ..
        } = self.links[slot as usize];
        if !linked {
            return;
        }
        match newer {
            NONE => self.newest = older,
            newer => self.links[newer as usize].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            older => self.links[older as usize].newer = newer,
        }
        self.links[slot as usize] = UNLINKED;
    }

    /// Makes a linked `slot` the newest; unlinked slots are left alone.
    pub fn touch(&mut self, slot: u32, now: MonoTime) {
        if self.is_linked(slot) {
            self.remove(slot);
            self.push_newest(slot, now);
        }
    }

    /// The least recently touched slot and when it was touched.
    pub fn oldest(&self) -> Option<(u32, MonoTime)> {
        (self.oldest != NONE).then(|| (self.oldest, self.links[self.oldest as usize].stamp))
    }

    pub fn heap_bytes(&self) -> usize {
        self.links.capacity() * size_of::<Links>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_follows_touches_and_removals() {
        let t = MonoTime::from_nanos;
        let mut lru = LruList::default();
        assert_eq!(lru.oldest(), None);
        for slot in 0..4 {
            lru.push_newest(slot, t(u64::from(slot)));
        }
        assert_eq!(lru.oldest(), Some((0, t(0))));
        lru.touch(0, t(10));
        assert_eq!(lru.oldest(), Some((1, t(1))));
        lru.remove(2);
        lru.remove(2);
        lru.remove(1);
        assert_eq!(lru.oldest(), Some((3, t(3))));
        lru.remove(3);
        assert_eq!(lru.oldest(), Some((0, t(10))));
        lru.remove(0);
        assert_eq!(lru.oldest(), None);
        assert!(!lru.is_linked(0));
        lru.touch(0, t(11));
        assert!(!lru.is_linked(0), "touch does not link");
    }
}
