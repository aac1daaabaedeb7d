//! What a job reports: its identity and status, its counters per routine, the failures its
//! error strategies reported, its dead letters and its output lines.
//!
//! Plain, serialisable records: the engine fills them, the runtime API, the CLI's summary and a
//! durable store read and write them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::item::Item;

/// A job's identity, unique within a runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job-{}", self.0)
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepting input and running activations.
    Running,
    /// Became quiescent with no routine failing under `stop`.
    Completed,
    /// A routine failed under `stop` (or exhausted retries that then stop).
    Failed,
    /// Cancelled by the caller or by runtime shutdown.
    Cancelled,
    /// Stopped: it took no more input and started no new activation, the running ones
    /// ended ([`JobHandle::stop`](crate::JobHandle::stop); `routilux run` on a first Ctrl-C
    /// or SIGTERM). Queued items stay queued.
    Stopped,
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Stopped => "stopped",
        })
    }
}

/// Items of an activation that did not succeed, kept with the reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The routine whose activation failed.
    pub routine: String,
    /// The items it had been given, by slot.
    pub items: BTreeMap<String, Vec<Item>>,
    /// Why they were not processed.
    pub error: String,
    /// How many times the logic ran on them.
    pub attempts: u32,
    /// How many outputs the failed activation had already delivered downstream before it
    /// failed (a streaming routine's: a retrying routine's attempt delivers nothing until it
    /// succeeds, so it is 0 there).
    #[serde(default)]
    pub delivered: u64,
    /// When they were dead-lettered.
    pub at: SystemTime,
}

impl DeadLetter {
    /// How many items this dead letter holds.
    pub fn len(&self) -> usize {
        self.items.values().map(Vec::len).sum()
    }

    /// Whether it holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An activation failure that the routine's strategy reported (`stop`, `continue`, or retries
/// exhausted into one of them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActivationFailure {
    /// The routine.
    pub routine: String,
    /// The error's message.
    pub error: String,
    /// Whether the error said a retry could help.
    pub retryable: bool,
    /// How many times the logic ran.
    pub attempts: u32,
    /// The strategy that handled it (`stop`, `continue`, `retry`).
    pub strategy: String,
    /// When it happened.
    pub at: SystemTime,
}

/// A line a routine logged during a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputLine {
    /// The routine that logged it.
    pub routine: String,
    /// `trace`, `debug`, `info`, `warn` or `error` (or `stdout`/`stderr` for guest output).
    pub level: String,
    /// The text.
    pub message: String,
}

/// Counters of one routine within one job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutineCounters {
    /// Activations run (every attempt counts).
    pub activations: u64,
    /// Items delivered into the routine's slots.
    pub items_in: u64,
    /// Items the routine emitted (for a retrying routine: those of its attempts that
    /// succeeded, the only ones released).
    pub items_out: u64,
    /// Items consumed by successful activations.
    pub processed: u64,
    /// Failed attempts (before any retry).
    pub failures: u64,
    /// Failures reported under `stop` or `continue`.
    pub errors: u64,
    /// Failures skipped under `skip`.
    pub skipped: u64,
    /// Retries run.
    pub retries: u64,
    /// Items kept as dead letters.
    pub dead_lettered: u64,
    /// Items a durable job left unfinished when it halted (failed, was cancelled, or its
    /// store failed): not dead letters, since its store keeps them, or the items they came
    /// from, queued for a resume to run.
    #[serde(default)]
    pub left_in_store: u64,
    /// Items accepted beyond a slot's bound to break a stall (see the scheduler docs).
    pub overflowed: u64,
    /// Items still queued.
    pub queued: u64,
    /// Time spent in logic, in microseconds.
    pub busy_us: u64,
}
