//! Budgets in bytes: what a routine (a guest, above all) may hand the host.
//!
//! Counts bound how many things the host keeps; budgets bound how *big* they are, so no
//! routine can grow the host's memory without limit by handing it large values:
//!
//! | per | budget | default | past it |
//! | --- | --- | --- | --- |
//! | emitted item | [`RoutineBudgets::item_bytes`] | 16 MiB | the emit fails (non-retryable, names event, size and budget) |
//! | slot | [`SlotSpec::max_queue_bytes`](crate::SlotSpec) | 64 MiB | the slot is *full*: the same backpressure as full by count; an item larger than the whole budget fails its emit or post |
//! | routine's WorkerState | [`RoutineBudgets::state_bytes`], [`RoutineBudgets::state_value_bytes`] | 16 MiB, 1 MiB | the write fails, naming the key (sizes checked on the JSON text, before anything is parsed) |
//! | activation's output | [`RoutineBudgets::output_bytes`] (stdout, stderr and log together) | 1 MiB | the rest is not kept and the activation fails |
//! | a retrying attempt's held emits | [`RoutineBudgets::attempt_bytes`] | 64 MiB | the emit fails |
//! | error message | [`Budgets::error_bytes`] | 4 KiB | cut, saying how much was cut |
//! | dead letters of a job | [`Budgets::dead_letters`], [`Budgets::dead_letter_bytes`] | 10,000, 64 MiB | counted (and handed to the runtime's dead-letter sink, if any), not kept |
//! | output kept by a job | [`Budgets::output_lines`], [`Budgets::output_bytes`] | 10,000 lines, 4 MiB | a ring: the oldest lines go, counted |
//! | a whole job | [`Budgets::memory`] | 2 GiB | the sum of its guests' linear memories, its queued items (their text and 128 bytes each for what the host keeps of an item) and what it retains; a guest growing past it traps, a slot past it is full |
//! | a group's (tenant's) running jobs together | `Runtime::set_group_memory` | none (`serve`: 4 GiB) | as past a job's budget, the errors naming the quota; a finished job leaves it |
//! | a group's live instances, busy or idle | `Runtime::set_group_instances` (a count) | none (`serve`: 256) | an idle one of the group is dropped for a new one; all busy: the checkout waits up to the routine's timeout, then fails retryable naming the quota |
//! | a group's queued items | `Runtime::set_group_queued_items` (a count) | none (`serve`: 1,000,000) | a slot is *full*, as past the group's memory quota; a durable post's unit is committed only once all of it fits |
//!
//! Only a single value over its budget, or retention that cannot wait, is an error: a slot at
//! its byte budget is merely full. Every error names the routine, slot or key, the budget and
//! the size.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Budgets of one job of a flow (set with [`Flow::budgets`](crate::Flow::budgets)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Most bytes a job may hold at once: its guests' memories, queued items, WorkerState,
    /// dead letters and kept output together. Default 2 GiB.
    pub memory: u64,
    /// Most dead letters a job keeps whole. Default 10,000.
    pub dead_letters: usize,
    /// Most bytes of items its kept dead letters hold. Default 64 MiB.
    pub dead_letter_bytes: u64,
    /// Most output lines a job keeps (a ring of the latest). Default 10,000.
    pub output_lines: usize,
    /// Most bytes of output a job keeps. Default 4 MiB.
    pub output_bytes: u64,
    /// Longest error message kept, in bytes. Default 4 KiB.
    pub error_bytes: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            memory: 2 << 30,
            dead_letters: 10_000,
            dead_letter_bytes: 64 << 20,
            output_lines: 10_000,
            output_bytes: 4 << 20,
            error_bytes: 4 << 10,
        }
    }
}

/// Budgets of one routine (set with [`Routine::budgets`](crate::Routine::budgets)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutineBudgets {
    /// Largest item it may emit (JSON text), in bytes. Default 16 MiB.
    pub item_bytes: u64,
    /// Most bytes its WorkerState may hold (keys and JSON values). Default 16 MiB.
    pub state_bytes: u64,
    /// Largest single WorkerState value (JSON text), in bytes. Default 1 MiB.
    pub state_value_bytes: u64,
    /// Most bytes one activation may print or log (stdout, stderr and log together).
    /// Default 1 MiB.
    pub output_bytes: u64,
    /// Most bytes of items one attempt of a retrying routine may emit (they are held until
    /// the attempt succeeds). Default 64 MiB.
    pub attempt_bytes: u64,
}

impl Default for RoutineBudgets {
    fn default() -> Self {
        Self {
            item_bytes: 16 << 20,
            state_bytes: 16 << 20,
            state_value_bytes: 1 << 20,
            output_bytes: 1 << 20,
            attempt_bytes: 64 << 20,
        }
    }
}

/// Bytes a job holds against [`Budgets::memory`]: reserved before they are kept, released
/// when they are let go. Lock-free; `used` never passes `limit` through [`Meter::reserve`]
/// (only [`Meter::force`], for what cannot be refused, such as an overrun that breaks a
/// stall, may).
///
/// A job's meter may have a parent: the meter its group (tenant) shares with its other jobs
/// (see `Runtime::set_group_memory`). Every byte reserved, forced or released here is on the
/// parent too, so a reservation succeeds only within both limits; the parent's limit can
/// change while jobs run (a lower one refuses new reservations until enough is let go).
#[derive(Debug)]
pub(crate) struct Meter {
    limit: AtomicU64,
    used: AtomicU64,
    peak: AtomicU64,
    parent: Option<Link>,
    /// It counts queued items, not bytes (a job's share of its group's `queued_items`
    /// quota): only the wording of its refusals differs.
    items: bool,
}

/// A meter's tie to its parent. Every change of a linked meter happens under `attached`, so
/// [`Meter::detach`] hands the parent back exactly what is on it (no reservation or release
/// can fall between reading `used` and giving it back).
#[derive(Debug)]
struct Link {
    to: Arc<Meter>,
    attached: Mutex<bool>,
}

/// What a job's queued items are charged to: its memory meter (their text and overhead) and,
/// when its group has a quota of queued items, its count of them on that quota.
#[derive(Clone, Copy)]
pub(crate) struct Charge<'a> {
    pub(crate) bytes: &'a Meter,
    pub(crate) items: Option<&'a Meter>,
}

/// Which limit refused a reservation, and how full it was (for error messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The job's own memory budget.
    Job { limit: u64, used: u64 },
    /// The memory quota the job's group (tenant) shares with its other jobs.
    Group { limit: u64, used: u64 },
    /// The quota of queued items the job's group shares with its other jobs.
    GroupItems { limit: u64, used: u64 },
}

impl Refusal {
    /// Whether letting time pass may help: the group's other jobs may let memory go, while a
    /// job's own budget is the job's business.
    pub(crate) fn transient(&self) -> bool {
        matches!(self, Refusal::Group { .. } | Refusal::GroupItems { .. })
    }
}

impl std::fmt::Display for Refusal {
    /// `the job's memory budget of 64.0 MiB (60.0 MiB in use)`, or `its tenant's memory
    /// quota of 1.0 GiB (1.0 GiB in use by all its jobs)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Refusal::Job { limit, used } => write!(
                f,
                "the job's memory budget of {} ({} in use)",
                bytes(limit),
                bytes(used)
            ),
            Refusal::Group { limit, used } => write!(
                f,
                "its tenant's memory quota of {} ({} in use by all its jobs)",
                bytes(limit),
                bytes(used)
            ),
            Refusal::GroupItems { limit, used } => write!(
                f,
                "its tenant's quota of {limit} queued items ({used} taken by all its jobs)"
            ),
        }
    }
}

impl Meter {
    pub(crate) fn new(limit: u64) -> Self {
        Self::with_parent(limit, None)
    }

    /// A meter whose every byte also counts on `parent` (a group's shared meter) until it
    /// is detached.
    pub(crate) fn with_parent(limit: u64, parent: Option<Arc<Meter>>) -> Self {
        Self::make(limit, parent, false)
    }

    /// A job's count of queued items on its group's quota of them (`parent`): no limit of
    /// its own.
    pub(crate) fn items(parent: Arc<Meter>) -> Self {
        Self::make(u64::MAX, Some(parent), true)
    }

    fn make(limit: u64, parent: Option<Arc<Meter>>, items: bool) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            parent: parent.map(|to| Link {
                to,
                attached: Mutex::new(true),
            }),
            items,
        }
    }

    /// A refusal by the parent, worded for what this meter counts.
    fn group_refusal(&self, limit: u64, used: u64) -> Refusal {
        if self.items {
            Refusal::GroupItems { limit, used }
        } else {
            Refusal::Group { limit, used }
        }
    }

    /// Reserves `n` bytes if that stays within the limit (and the parent's); returns whether
    /// it did.
    pub(crate) fn reserve(&self, n: u64) -> bool {
        self.try_reserve(n).is_ok()
    }

    /// Reserves `n` bytes if that stays within the limit (and the parent's), or says which
    /// limit refused, as it was at that moment.
    pub(crate) fn try_reserve(&self, n: u64) -> Result<(), Refusal> {
        let Some(link) = &self.parent else {
            let new = self.reserve_here(n)?;
            self.peak.fetch_max(new, Ordering::Relaxed);
            return Ok(());
        };
        let attached = link.attached.lock();
        let new = self.reserve_here(n)?;
        if *attached && let Err(refused) = link.to.reserve_here(n) {
            self.release_here(n);
            return Err(match refused {
                Refusal::Job { limit, used }
                | Refusal::Group { limit, used }
                | Refusal::GroupItems { limit, used } => self.group_refusal(limit, used),
            });
        }
        if *attached {
            link.to.peak.fetch_max(link.to.used(), Ordering::Relaxed);
        }
        // Raised only once both took it: a peak never shows what was refused.
        self.peak.fetch_max(new, Ordering::Relaxed);
        Ok(())
    }

    /// Adds `n` to `used` if that stays within the limit; the new `used`, or the refusal.
    fn reserve_here(&self, n: u64) -> Result<u64, Refusal> {
        let limit = self.limit();
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(new) = used.checked_add(n).filter(|&new| new <= limit) else {
                return Err(Refusal::Job { limit, used });
            };
            match self
                .used
                .compare_exchange_weak(used, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(new),
                Err(now) => used = now,
            }
        }
    }

    /// Reserves `n` bytes whatever the limit (on the parent too).
    pub(crate) fn force(&self, n: u64) {
        let attached = self.parent.as_ref().map(|l| (l, l.attached.lock()));
        let new = self.used.fetch_add(n, Ordering::AcqRel).saturating_add(n);
        self.peak.fetch_max(new, Ordering::Relaxed);
        if let Some((link, attached)) = attached
            && *attached
        {
            link.to.force(n);
        }
    }

    /// Gives `n` reserved bytes back (on the parent too).
    pub(crate) fn release(&self, n: u64) {
        let attached = self.parent.as_ref().map(|l| (l, l.attached.lock()));
        let freed = self.release_here(n);
        if let Some((link, attached)) = attached
            && *attached
        {
            link.to.release(freed);
        }
    }

    /// Gives back up to `n` bytes; returns how many it gave (never more than were used).
    fn release_here(&self, n: u64) -> u64 {
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or_else(|u| u);
        before.min(n)
    }

    /// Unties the meter from its parent, giving the parent back everything on it: what the
    /// meter holds from now on (a finished job's kept output and dead letters) is its own.
    pub(crate) fn detach(&self) {
        if let Some(link) = &self.parent {
            let mut attached = link.attached.lock();
            if *attached {
                *attached = false;
                link.to.release(self.used());
            }
        }
    }

    /// Whether `n` more bytes would fit now, here and on the parent.
    pub(crate) fn has_room(&self, n: u64) -> bool {
        self.used().saturating_add(n) <= self.limit()
            && self.parent.as_ref().is_none_or(|p| p.to.has_room(n))
    }

    /// Whether the parent's other children (a group's other jobs) hold more than half of the
    /// parent's limit: then only they can make room for this one, and waiting on them may be
    /// long; else this one holds much of it itself and its own consumers make room.
    pub(crate) fn others_hold_most(&self) -> bool {
        self.parent.as_ref().is_some_and(|p| {
            let others = p.to.used().saturating_sub(self.used());
            others.saturating_mul(2) > p.to.limit()
        })
    }

    /// Whether a unit of `n` more would fit now, here and on the parent, `n` cut to each
    /// limit: a unit larger than a whole limit waits only for that limit to be free.
    pub(crate) fn has_room_for_unit(&self, n: u64) -> bool {
        let limit = self.limit();
        self.used().saturating_add(n.min(limit)) <= limit
            && self
                .parent
                .as_ref()
                .is_none_or(|p| p.to.has_room_for_unit(n))
    }

    /// Which limit a reservation of `n` bytes would pass (the job's own first), as of now.
    pub(crate) fn refusal(&self, n: u64) -> Refusal {
        let (limit, used) = (self.limit(), self.used());
        if used.saturating_add(n) > limit {
            return Refusal::Job { limit, used };
        }
        match &self.parent {
            Some(p) => self.group_refusal(p.to.limit(), p.to.used()),
            None => Refusal::Job { limit, used },
        }
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit (a group's quota, reloaded): what is reserved stays, new
    /// reservations are held to the new limit.
    pub(crate) fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.detach();
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), saying how much was cut.
pub(crate) fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!(" […{} more bytes cut]", total - end));
    text
}

/// A byte count for people: `512 B`, `12.3 KiB`, `64.0 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_never_passes_its_limit_by_reserving() {
        let m = Meter::new(100);
        assert!(m.reserve(60));
        assert!(!m.reserve(41));
        assert!(m.reserve(40));
        assert!(!m.reserve(1));
        m.release(50);
        assert_eq!(m.used(), 50);
        assert!(!m.reserve(u64::MAX));
        m.force(80);
        assert_eq!((m.used(), m.peak()), (130, 130));
        m.release(1000);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn a_child_meter_is_held_to_its_parent_too_and_says_which_refused() {
        let group = Arc::new(Meter::new(100));
        let a = Meter::with_parent(80, Some(group.clone()));
        let b = Meter::with_parent(80, Some(group.clone()));
        assert!(a.reserve(70));
        assert!(!a.reserve(11), "past a's own budget");
        assert!(matches!(
            a.refusal(11),
            Refusal::Job {
                limit: 80,
                used: 70
            }
        ));
        assert!(b.reserve(30));
        assert!(!b.reserve(1), "past the group's quota");
        assert_eq!(b.used(), 30, "a refused reservation leaves nothing behind");
        assert!(!b.has_room(1) && a.has_room(0));
        assert_eq!(
            b.refusal(1),
            Refusal::Group {
                limit: 100,
                used: 100
            }
        );
        assert!(b.refusal(1).transient() && !a.refusal(11).transient());
        assert!(
            b.refusal(1)
                .to_string()
                .contains("tenant's memory quota of 100 B")
        );
        b.force(50);
        assert_eq!((group.used(), group.peak()), (150, 150));
        a.release(70);
        b.release(80);
        assert_eq!((group.used(), a.used(), b.used()), (0, 0, 0));
        group.set_limit(10);
        assert!(!a.reserve(11) && a.reserve(10));
        assert!(b.reserve(0));
        b.force(7);
        b.detach();
        assert_eq!(group.used(), 10, "b gave back all it held, a keeps its 10");
        b.force(5);
        b.release(12);
        assert_eq!(
            (group.used(), b.used()),
            (10, 0),
            "b counts alone once detached"
        );
        drop(a);
        assert_eq!(group.used(), 0, "a dropped meter gives back what it held");
    }

    #[test]
    fn cutting_keeps_characters_whole_and_says_how_much() {
        assert_eq!(cut("short".into(), 10), "short");
        assert_eq!(cut("ééé".into(), 3), "é […4 more bytes cut]");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
