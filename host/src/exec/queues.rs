//! The queues of one routine within one job: its slots' items, their bytes and their
//! reservation on the job's memory meter, and the routine's scheduling marks.
//!
//! Every item enters a slot through [`Queues::push`] and leaves it through [`Queues::take`],
//! always under the routine's queue lock (held by the caller). This is the one place where a
//! job's queued items live, so it is where a durable store takes over: it holds the same queues
//! and commits what an attempt took from them together with what the attempt produced (the
//! execution layer's `commit_attempt`).
//!
//! Nothing here schedules, waits or runs logic: deciding to schedule a check after a push, and
//! what to do when a slot is full, is the delivery module's business.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use crate::model::budget::{Charge, Meter, Refusal};
use crate::model::item::Item;
use crate::model::plan::CompiledRoutine;

/// How far past its bound (in items) a slot may be overrun to break a wait that could never
/// end (a cycle, a stalled pool), when the bound itself is smaller: enough for the nesting of
/// blocked emitters, not for a routine that multiplies items in a loop.
pub(crate) const OVERRUN_ITEMS: usize = 1024;

/// The chunk in which a slot reserves bytes on its job's memory meter: one shared atomic
/// operation per this many bytes queued, not one per item (the meter over-counts by at most
/// about two chunks per slot).
const CREDIT_CHUNK: u64 = 64 << 10;

/// What the host keeps per queued item beyond its JSON text (the item's shared header, its
/// place in the queue), charged to the memory meter with the text: without it a flood of
/// tiny items would hold many times what the meter counts.
pub(crate) const ITEM_OVERHEAD: u64 = 128;

/// The chunk in which a slot reserves items on its group's quota of queued items (when it
/// has one), as [`CREDIT_CHUNK`] for bytes: the count over-counts by at most about two
/// chunks per slot.
const ITEM_CHUNK: u64 = 32;

/// How an item went into a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Within every bound.
    Within,
    /// Past the slot's bound, to break a wait that could never end (counted `overflowed`).
    Overrun,
}

pub(crate) struct Queues {
    pub(crate) slots: Vec<VecDeque<Item>>,
    /// In a durable job, the seq each queued item has in the job's store, slot by slot in
    /// the order of `slots` (`None` in a job that is not durable: nothing to keep).
    seqs: Option<Vec<VecDeque<u64>>>,
    /// Bytes (of items' JSON text) queued in each slot.
    bytes: Vec<u64>,
    /// Bytes each slot holds reserved on the job's meter: reserved and given back in chunks
    /// (see [`CREDIT_CHUNK`]), so a delivery touches the shared meter once every many items.
    credit: Vec<u64>,
    /// Items each slot holds reserved on its group's quota of queued items (if the group has
    /// one), in chunks of [`ITEM_CHUNK`].
    item_credit: Vec<u64>,
    /// Items ever pushed (kept under the lock: one atomic less per delivery).
    pub(crate) items_in: u64,
    /// Activations of the routine running now.
    pub(crate) running: usize,
    /// A check task of the routine is scheduled.
    pub(crate) scheduled: bool,
    /// A `time_interval` wake-up of the routine is armed.
    pub(crate) timer_armed: bool,
    pub(crate) last_fire: Option<Instant>,
    /// Activations formed so far (each batch released gets the next number).
    pub(crate) formed: u64,
}

impl Queues {
    pub(crate) fn new(r: &CompiledRoutine, durable: bool) -> Self {
        let n = r.capacities.len();
        Queues {
            slots: (0..n).map(|_| VecDeque::new()).collect(),
            seqs: durable.then(|| (0..n).map(|_| VecDeque::new()).collect()),
            bytes: vec![0; n],
            credit: vec![0; n],
            item_credit: vec![0; n],
            items_in: 0,
            running: 0,
            scheduled: false,
            timer_armed: false,
            last_fire: None,
            formed: 0,
        }
    }

    /// Queues `item` into `slot`. A full slot (by count, by bytes, or with the job's memory
    /// budget spent) gives the item back, unless `overrun`; an overrun goes past the bounds only
    /// so far (by the slot's bound again or [`OVERRUN_ITEMS`], whichever is more, and by its
    /// byte budget again) and then gives the item back too. Never takes an item larger than the
    /// slot's whole byte budget. `seq`: the item's place in a durable job's store (ignored
    /// otherwise).
    #[inline]
    pub(crate) fn push(
        &mut self,
        r: &CompiledRoutine,
        slot: usize,
        item: Item,
        seq: u64,
        overrun: bool,
        charge: Charge<'_>,
    ) -> Result<Pushed, Item> {
        let len = item.byte_len() as u64;
        let (cap, budget) = (r.capacities[slot], r.queue_bytes[slot]);
        let (count, held) = (self.slots[slot].len(), self.bytes[slot]);
        if len > budget {
            return Err(item);
        }
        let full = count >= cap || held + len > budget;
        let need = self.need(slot, len);
        let how = if !full
            && self.reserve_items(slot, charge)
            && (need == 0 || self.reserve_credit(slot, need, charge))
        {
            Pushed::Within
        } else if !overrun
            || count >= cap.saturating_add(cap.max(OVERRUN_ITEMS))
            || held + len > budget.saturating_mul(2)
        {
            return Err(item);
        } else {
            self.force(slot, need, charge);
            Pushed::Overrun
        };
        self.slots[slot].push_back(item);
        if let Some(seqs) = &mut self.seqs {
            seqs[slot].push_back(seq);
        }
        self.bytes[slot] += len;
        self.items_in += 1;
        Ok(how)
    }

    /// Queues an item a durable job's store held when the job was recovered: past every
    /// bound if need be (what was committed is never dropped), charged to the meter.
    pub(crate) fn recovered(&mut self, slot: usize, item: Item, seq: u64, charge: Charge<'_>) {
        let need = self.need(slot, item.byte_len() as u64);
        self.force(slot, need, charge);
        let len = item.byte_len() as u64;
        self.slots[slot].push_back(item);
        if let Some(seqs) = &mut self.seqs {
            seqs[slot].push_back(seq);
        }
        self.bytes[slot] += len;
        self.items_in += 1;
    }

    /// Takes `counts[i]` items from the front of each slot `i` (a batch the policy released).
    /// Also says whether a slot it took from was full (at its count, or within one largest
    /// item of its byte budget): only then can a producer be waiting for room. In a durable
    /// job, also their seqs as `(slot, seq)` (see [`Batch::seqs`](crate::model::activation::Batch)).
    #[inline]
    pub(crate) fn take(
        &mut self,
        r: &CompiledRoutine,
        counts: &[usize],
        charge: Charge<'_>,
    ) -> (Vec<Vec<Item>>, bool, Vec<(u32, u64)>) {
        let freed_full = counts.iter().enumerate().any(|(i, &k)| {
            k > 0
                && (self.slots[i].len() >= r.capacities[i]
                    || self.bytes[i] >= r.queue_bytes[i].saturating_sub(r.budgets.item_bytes))
        });
        let mut data: Vec<Vec<Item>> = Vec::with_capacity(counts.len());
        for (i, &k) in counts.iter().enumerate() {
            let mut items = Vec::with_capacity(k);
            let mut b = 0;
            for it in self.slots[i].drain(..k) {
                b += it.byte_len() as u64;
                items.push(it);
            }
            if k > 0 {
                self.bytes[i] -= b;
                self.return_credit(i, charge);
            }
            data.push(items);
        }
        let mut taken = Vec::new();
        if let Some(seqs) = &mut self.seqs {
            for (i, &k) in counts.iter().enumerate() {
                taken.extend(seqs[i].drain(..k).map(|s| (i as u32, s)));
            }
        }
        (data, freed_full, taken)
    }

    /// Counts an item that was never queued because it could not be delivered (it became a
    /// dead letter of this routine): it came in all the same.
    pub(crate) fn count_undelivered(&mut self) {
        self.items_in += 1;
    }

    /// Reserves at least `need` more bytes for `slot` on the meter (a whole chunk when there
    /// is room for one); false if the job's budget has no room for `need`.
    fn reserve_credit(&mut self, slot: usize, need: u64, charge: Charge<'_>) -> bool {
        reserve_ahead(charge.bytes, need, CREDIT_CHUNK, &mut self.credit[slot])
    }

    /// Reserves room for one more item in `slot` on its group's quota of queued items, if
    /// the group has one (a chunk when there is room for one); false if it has none left.
    #[inline]
    fn reserve_items(&mut self, slot: usize, charge: Charge<'_>) -> bool {
        let Some(items) = charge.items else {
            return true;
        };
        let need = self.need_items(slot);
        need == 0 || reserve_ahead(items, need, ITEM_CHUNK, &mut self.item_credit[slot])
    }

    /// Charges one more item of `need` bytes (beyond the slot's credit) to `slot` whatever
    /// the limits.
    fn force(&mut self, slot: usize, need: u64, charge: Charge<'_>) {
        charge.bytes.force(need);
        self.credit[slot] += need;
        if let Some(items) = charge.items {
            let need = self.need_items(slot);
            items.force(need);
            self.item_credit[slot] += need;
        }
    }

    /// Gives back what `slot` holds reserved beyond its queued items and one chunk (all of
    /// it once the slot is empty while its job's budget or its group's quota nears its end,
    /// so that idle slots do not hold them spent).
    #[inline]
    fn return_credit(&mut self, slot: usize, charge: Charge<'_>) {
        let (held, empty) = (self.charged(slot), self.slots[slot].is_empty());
        give_back_spare(
            charge.bytes,
            &mut self.credit[slot],
            held,
            CREDIT_CHUNK,
            empty.then_some(16 * CREDIT_CHUNK),
        );
        if let Some(items) = charge.items {
            let queued = self.slots[slot].len() as u64;
            give_back_spare(
                items,
                &mut self.item_credit[slot],
                queued,
                ITEM_CHUNK,
                empty.then_some(32 * ITEM_CHUNK),
            );
        }
    }

    /// What one more item in `slot` needs reserved on its group's quota of queued items
    /// beyond what the slot holds reserved (0 or 1).
    fn need_items(&self, slot: usize) -> u64 {
        self.items_needed(slot, 1)
    }

    /// What `n` more items in `slot` need reserved on its group's quota of queued items
    /// beyond what the slot holds reserved.
    fn items_needed(&self, slot: usize, n: u64) -> u64 {
        (self.slots[slot].len() as u64 + n).saturating_sub(self.item_credit[slot])
    }

    /// Whether one more item in `slot` has room on its group's quota of queued items (if the
    /// group has one).
    fn items_room(&self, slot: usize, charge: Charge<'_>) -> bool {
        let need = self.need_items(slot);
        need == 0 || charge.items.is_none_or(|m| m.has_room(need))
    }

    /// Whether a durable post's unit of `n` items (committed before it is queued) finds room
    /// in `slot` on its group's quota of queued items, all of it (if the group has one): so
    /// that a unit admitted does not go past the quota. (A check, not a reservation: posts
    /// racing for the last room may each pass, so a tenant can go past its quota by up to a
    /// unit per post in flight, what they committed then queued as `overflowed`.)
    pub(crate) fn unit_room(&self, slot: usize, n: u64, charge: Charge<'_>) -> bool {
        let need = self.items_needed(slot, n);
        need == 0 || charge.items.is_none_or(|m| m.has_room_for_unit(need))
    }

    /// Whether an item of `len` bytes would find room in `slot` now (within the slot's bounds
    /// and the job's memory budget, and its group's memory quota if it has one).
    #[inline]
    pub(crate) fn has_room(
        &self,
        r: &CompiledRoutine,
        slot: usize,
        len: u64,
        charge: Charge<'_>,
    ) -> bool {
        let need = self.need(slot, len);
        self.within_slot(r, slot, len)
            && (need == 0 || charge.bytes.has_room(need))
            && self.items_room(slot, charge)
    }

    /// Whether an item of `len` bytes is within `slot`'s own bounds (count and bytes).
    fn within_slot(&self, r: &CompiledRoutine, slot: usize, len: u64) -> bool {
        self.slots[slot].len() < r.capacities[slot] && self.bytes[slot] + len <= r.queue_bytes[slot]
    }

    /// Whether an item of `len` bytes finds no room in `slot` only because a quota of the
    /// job's group (tenant) is spent (memory, queued items) and the group's other jobs hold
    /// most of it: the slot and the job have room, so only they can make some. (A job holding
    /// half the quota or more itself waits as for a full slot: its own consumers drain it.)
    pub(crate) fn blocked_by_group(
        &self,
        r: &CompiledRoutine,
        slot: usize,
        len: u64,
        charge: Charge<'_>,
    ) -> bool {
        self.blocked_by_quota(r, slot, len, charge, true)
    }

    /// Whether an item of `len` bytes finds no room in `slot` only because a quota of the
    /// job's group is spent, whoever holds it (`others_only`: and the group's other jobs hold
    /// most of it, see [`Queues::blocked_by_group`]).
    pub(crate) fn blocked_by_quota(
        &self,
        r: &CompiledRoutine,
        slot: usize,
        len: u64,
        charge: Charge<'_>,
        others_only: bool,
    ) -> bool {
        let need = self.need(slot, len);
        let meter = charge.bytes;
        let others = |m: &Meter| !others_only || m.others_hold_most();
        self.within_slot(r, slot, len)
            && ((need > 0
                && !meter.has_room(need)
                && meter.refusal(need).transient()
                && others(meter))
                || (!self.items_room(slot, charge) && charge.items.is_some_and(others)))
    }

    /// Why an item of `len` bytes finds no room in `slot` now, for an error: the bound it is
    /// at, with the figures.
    pub(crate) fn why_full(
        &self,
        r: &CompiledRoutine,
        slot: usize,
        len: u64,
        charge: Charge<'_>,
    ) -> String {
        let (cap, budget) = (r.capacities[slot], r.queue_bytes[slot]);
        if self.slots[slot].len() >= cap {
            format!("at its bound of {cap} items")
        } else if self.bytes[slot] + len > budget {
            format!(
                "at its byte budget of {}",
                crate::model::budget::bytes(budget)
            )
        } else {
            format!("no room left in {}", self.refusal(slot, len, charge))
        }
    }

    /// Which of the job's and its group's limits an item of `len` bytes finds no room in,
    /// past `slot`'s own bounds: the group's quota of queued items, or the memory meter's.
    pub(crate) fn refusal(&self, slot: usize, len: u64, charge: Charge<'_>) -> Refusal {
        // (The item's bytes having room, what refused was the quota of queued items, for a
        // unit of several.)
        let need = self.need(slot, len);
        let items_spent =
            !self.items_room(slot, charge) || need == 0 || charge.bytes.has_room(need);
        match charge.items.filter(|_| items_spent) {
            Some(items) => items.refusal(self.need_items(slot)),
            None => charge.bytes.refusal(need),
        }
    }

    /// What `slot`'s queued items are charged on the meter: their text and overhead.
    fn charged(&self, slot: usize) -> u64 {
        self.bytes[slot] + self.slots[slot].len() as u64 * ITEM_OVERHEAD
    }

    /// What one more item of `len` bytes needs reserved beyond what `slot` holds reserved.
    fn need(&self, slot: usize, len: u64) -> u64 {
        (self.charged(slot) + len + ITEM_OVERHEAD).saturating_sub(self.credit[slot])
    }

    /// Whether any slot holds an item.
    #[inline]
    pub(crate) fn any_queued(&self) -> bool {
        self.slots.iter().any(|s| !s.is_empty())
    }

    /// How many items are queued in all slots.
    pub(crate) fn queued(&self) -> usize {
        self.slots.iter().map(VecDeque::len).sum()
    }

    /// The queued items by slot name.
    pub(crate) fn items(&self, r: &CompiledRoutine) -> BTreeMap<String, Vec<Item>> {
        r.slot_names
            .iter()
            .zip(&self.slots)
            .map(|(s, d)| (s.to_string(), d.iter().cloned().collect()))
            .collect()
    }
}

/// Reserves `need` more on `meter` for a slot's `credit`, a whole `chunk` when there is room
/// for one (so that a slot touches the shared meter once every many items); false, nothing
/// reserved, if there is no room for `need`.
fn reserve_ahead(meter: &Meter, need: u64, chunk: u64, credit: &mut u64) -> bool {
    let chunk = need.max(chunk);
    let got = if meter.reserve(chunk) {
        chunk
    } else if meter.reserve(need) {
        need
    } else {
        return false;
    };
    *credit += got;
    true
}

/// Gives back what a slot's `credit` holds beyond what it `holds` and one chunk, once that
/// is more than two chunks; or all of it when the slot is empty (`near` is `Some`) and
/// `meter` has no room for `near` more: so that slots left idle do not hold a budget or a
/// quota spent as it nears its end.
fn give_back_spare(meter: &Meter, credit: &mut u64, holds: u64, chunk: u64, near: Option<u64>) {
    let spare = credit.saturating_sub(holds);
    let keep = match near {
        Some(n) if spare > 0 && !meter.has_room(n) => 0,
        _ => chunk,
    };
    if spare > 2 * chunk || (keep == 0 && spare > 0) {
        let give = spare - keep.min(spare);
        *credit -= give;
        meter.release(give);
    }
}
