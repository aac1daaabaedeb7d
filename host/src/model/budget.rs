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
//! | a whole job | [`Budgets::memory`] | 2 GiB | the sum of its guests' linear memories, its queued items and what it retains; a guest growing past it traps, a slot past it is full |
//!
//! Only a single value over its budget, or retention that cannot wait, is an error: a slot at
//! its byte budget is merely full. Every error names the routine, slot or key, the budget and
//! the size.

use std::sync::atomic::{AtomicU64, Ordering};

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
#[derive(Debug)]
pub(crate) struct Meter {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Meter {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Reserves `n` bytes if that stays within the limit; returns whether it did.
    pub(crate) fn reserve(&self, n: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(new) = used.checked_add(n).filter(|&new| new <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(new, Ordering::Relaxed);
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    /// Reserves `n` bytes whatever the limit.
    pub(crate) fn force(&self, n: u64) {
        let new = self.used.fetch_add(n, Ordering::AcqRel).saturating_add(n);
        self.peak.fetch_max(new, Ordering::Relaxed);
    }

    /// Gives `n` reserved bytes back.
    pub(crate) fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
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
    fn cutting_keeps_characters_whole_and_says_how_much() {
        assert_eq!(cut("short".into(), 10), "short");
        assert_eq!(cut("ééé".into(), 3), "é […4 more bytes cut]");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
