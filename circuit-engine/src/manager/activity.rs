//! The panic guards' view: which upstreams are active and which fail for the node, per
//! group and for the node, kept as marks that expire `tracking.activity_window` after an
//! upstream's last signal.

use super::{ActivityMark, Breakers};
use crate::{
    breaker::Signal,
    clock::{Clock, MonoTime},
    lru::LruList,
    rules::GroupId,
};

impl<C: Clock> Breakers<C> {
    /// Updates the panic guard's view after an outcome classified as `signal`: active, and
    /// `failing` when it was a failure enough clients witness.
    pub(super) fn mark_activity(&mut self, i: u32, signal: Signal, failing: bool, now: MonoTime) {
        if matches!(signal, Signal::Ignored | Signal::Abandoned) {
            return;
        }
        let slot = self.slots[i as usize].as_mut().expect("occupied slot");
        let before = slot.activity;
        slot.activity = ActivityMark {
            active: true,
            failing,
            last_signal: now,
        };
        let (group, after) = (slot.group, slot.activity);
        if before.active {
            self.active_by_signal.touch(i, ());
        } else {
            self.active_by_signal.push_newest(i, ());
        }
        self.count_activity(group, before, after);
    }

    /// Moves one upstream's contribution to the node's and its group's activity counts.
    pub(super) fn count_activity(
        &mut self,
        group: Option<GroupId>,
        before: ActivityMark,
        after: ActivityMark,
    ) {
        let mut scopes = [Some(&mut self.node_activity), None];
        if let Some(group) = group {
            scopes[1] = Some(&mut self.groups[usize::from(group)].activity);
        }
        for activity in scopes.into_iter().flatten() {
            activity.active = activity.active + u32::from(after.active) - u32::from(before.active);
            activity.failing = activity.failing + u32::from(after.active && after.failing)
                - u32::from(before.active && before.failing);
        }
    }

    /// Ends the "active" marks older than the activity window.
    #[inline]
    pub(super) fn expire_activity(&mut self, now: MonoTime) {
        // Called on every outcome; rarely is anything due.
        if self.oldest_activity_expired(now).is_some() {
            self.expire_due_activity(now);
        }
    }

    /// The least recently signalled active slot, if its mark is older than the window.
    fn oldest_activity_expired(&self, now: MonoTime) -> Option<u32> {
        let (i, ()) = self.active_by_signal.oldest()?;
        let last_signal = self.slot(i).activity.last_signal;
        (last_signal.saturating_add(self.tracking.activity_window) <= now).then_some(i)
    }

    fn expire_due_activity(&mut self, now: MonoTime) {
        while let Some(i) = self.oldest_activity_expired(now) {
            self.active_by_signal.remove(i);
            let slot = self.slots[i as usize]
                .as_mut()
                .expect("active slots are occupied");
            let (group, before) = (slot.group, slot.activity);
            slot.activity.active = false;
            let after = slot.activity;
            self.count_activity(group, before, after);
        }
    }

    /// Orders the active slots by last signal again, from scratch.
    pub(super) fn rebuild_active_by_signal(&mut self) {
        let mut active: Vec<(MonoTime, u32)> = (self.slots.iter().enumerate())
            .filter_map(|(i, slot)| {
                let slot = slot.as_ref().filter(|slot| slot.activity.active)?;
                Some((slot.activity.last_signal, i as u32))
            })
            .collect();
        active.sort_unstable();
        self.active_by_signal = LruList::default();
        for (_, i) in active {
            self.active_by_signal.push_newest(i, ());
        }
    }
}
