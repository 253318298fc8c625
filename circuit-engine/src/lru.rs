//! An intrusive least-recently-used list over slot numbers: O(1) touch, insert, remove and
//! oldest, no allocation once the slots exist.
//!
//! Every outcome moves its slot to the newest end, which writes its neighbours' links: at
//! 16 bytes a slot, four to a cache line, the list stays small enough to be cached. A list
//! whose times are kept elsewhere (`LruList<()>`) takes 8 bytes a slot.

use crate::clock::MonoTime;

/// No slot: the end of the list.
const NONE: u32 = u32::MAX;
/// `older` of a slot that is not in the list (slot numbers stay below it).
const NOT_LINKED: u32 = u32::MAX - 1;

#[derive(Clone, Copy, Debug)]
struct Links<S> {
    newer: u32,
    older: u32,
    /// When the slot was last touched (or linked).
    stamp: S,
}

impl<S: Copy + Default> Links<S> {
    fn is_linked(&self) -> bool {
        self.older != NOT_LINKED
    }

    fn unlinked() -> Self {
        Self {
            newer: NONE,
            older: NOT_LINKED,
            stamp: S::default(),
        }
    }
}

/// `S`: what a slot's place in the list remembers of its last touch.
#[derive(Clone, Debug)]
pub struct LruList<S = MonoTime> {
    links: Vec<Links<S>>,
    newest: u32,
    oldest: u32,
}

impl<S> Default for LruList<S> {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            newest: NONE,
            oldest: NONE,
        }
    }
}

impl<S: Copy + Default> LruList<S> {
    /// Memory the list needs per slot.
    pub const BYTES_PER_SLOT: usize = size_of::<Links<S>>();

    pub fn is_linked(&self, slot: u32) -> bool {
        self.links.get(slot as usize).is_some_and(Links::is_linked)
    }

    /// Links `slot` as the newest entry.
    pub fn push_newest(&mut self, slot: u32, now: S) {
        debug_assert!(
            slot < NOT_LINKED,
            "slot numbers stay below the NOT_LINKED marker"
        );
        let i = slot as usize;
        if self.links.len() <= i {
            self.links.resize(i + 1, Links::unlinked());
        }
        debug_assert!(!self.links[i].is_linked(), "slot {slot} is already linked");
        self.links[i] = Links {
            newer: NONE,
            older: self.newest,
            stamp: now,
        };
        match self.newest {
            NONE => self.oldest = slot,
            newest => self.links[newest as usize].newer = slot,
        }
        self.newest = slot;
    }

    /// Unlinks `slot`; slots not in the list are left alone.
    pub fn remove(&mut self, slot: u32) {
        let Some(&Links { newer, older, .. }) = self.links.get(slot as usize) else {
            return;
        };
        if older == NOT_LINKED {
            return;
        }
        self.unlink(newer, older);
        self.links[slot as usize] = Links::unlinked();
    }

    /// Makes a linked `slot` the newest; unlinked slots are left alone.
    #[inline]
    pub fn touch(&mut self, slot: u32, now: S) {
        let Some(links) = self.links.get_mut(slot as usize) else {
            return;
        };
        let Links { newer, older, .. } = *links;
        if older == NOT_LINKED {
            return;
        }
        links.stamp = now;
        if newer == NONE {
            return; // already the newest
        }
        links.newer = NONE;
        links.older = self.newest;
        self.unlink(newer, older);
        self.links[self.newest as usize].newer = slot;
        self.newest = slot;
    }

    /// Joins the neighbours of a slot that leaves its place in the list.
    #[inline]
    fn unlink(&mut self, newer: u32, older: u32) {
        match newer {
            NONE => self.newest = older,
            newer => self.links[newer as usize].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            older => self.links[older as usize].newer = newer,
        }
    }

    /// The least recently touched slot and when it was touched.
    pub fn oldest(&self) -> Option<(u32, S)> {
        (self.oldest != NONE).then(|| (self.oldest, self.links[self.oldest as usize].stamp))
    }

    pub fn heap_bytes(&self) -> usize {
        self.links.capacity() * size_of::<Links<S>>()
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
        lru.push_newest(0, t(12));
        lru.push_newest(1, t(13));
        lru.touch(1, t(14)); // already the newest: only its time moves
        assert_eq!(lru.oldest(), Some((0, t(12))));
        lru.touch(0, t(15));
        assert_eq!(lru.oldest(), Some((1, t(14))));
    }
}
