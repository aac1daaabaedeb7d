//! Durable jobs: a job whose queues, WorkerState, dead letters and input positions live in a
//! [`Store`] as well as in memory, so that `kill -9` at any moment loses nothing it
//! acknowledged and a restart on the same directory resumes it.
//!
//! # The contract
//!
//! - **A post is acknowledged only once committed**: the item's `Queue` (with the position
//!   its input reached) is on disk before the post returns and before any routine sees it.
//! - **An activation is one unit**: the `Consume` of its batch, its WorkerState changes
//!   (resolved under the state's lock, so the store sees them in the order they apply) and a
//!   `Queue` for each delivery of each emit commit in one transaction, and only then are the
//!   emits delivered in memory. An activation does not wait for its unit before its routine's
//!   next one runs: its emits wait, undelivered and in order, until its group is on disk (see
//!   `Unsettled` in the run module), so a routine running one activation at a time shares its
//!   fsyncs across many activations. Every activation of a durable job is an attempt (its emits and
//!   state changes held until it ends), nested ones run by a blocked emitter too, so downstream
//!   never sees an item that is not on disk, and a failed activation delivered nothing.
//! - **A dead letter is one unit too**: the `Consume` of the items and the letter.
//! - Hence after a kill every acknowledged item is in exactly one of: processed (its outputs
//!   committed downstream), queued (in the store: the restart queues it again and runs it, at
//!   most once more per crash), or dead-lettered.
//!
//! An activation's number (its stable id, [`Context::activation_id`](crate::Context)) is
//! the seq of the first item it consumed, plus one: the same in a re-run after a crash.
//! Seqs are never reused (the store keeps the highest one given out).
//!
//! A job that halts (cancelled, or failed by another routine) does not dead-letter in its
//! store the batches it abandons: they stay queued there, and a resume runs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::store::{Op, Recovered, Store, StoreError};

/// The store of a durable job, and the next seq to give out.
pub(crate) struct Durable {
    pub(crate) store: Store,
    next_seq: AtomicU64,
}

impl Durable {
    pub(crate) fn new(store: Store, next_seq: u64) -> Self {
        Self {
            store,
            next_seq: AtomicU64::new(next_seq),
        }
    }

    /// Takes `n` consecutive seqs; returns the first.
    #[inline]
    pub(crate) fn take_seqs(&self, n: u64) -> u64 {
        self.next_seq.fetch_add(n, Ordering::Relaxed)
    }

    /// Commits `ops` as one unit and waits until it is on disk.
    pub(crate) fn commit(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.store.commit(ops)
    }
}

/// A durable job's store, opened (created, or recovered from a directory that holds one) and
/// not yet running: look at what it holds ([`JobStore::resumed`]), then start the job with
/// [`Runtime::exec_durable`](crate::Runtime::exec_durable).
pub struct JobStore {
    pub(crate) store: Store,
    pub(crate) recovered: Recovered,
    resumed: Resumed,
}

/// What a durable job's store held when it was opened.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Resumed {
    /// The directory.
    pub dir: PathBuf,
    /// Whether the store was made now (nothing to resume).
    pub created: bool,
    /// The job's header, as written when it was created (what it runs: the hashes a resume
    /// compares).
    #[serde(skip)]
    pub header: Vec<u8>,
    /// The status the job last finished with, if it ever did (`completed`, `failed`,
    /// `cancelled`, `stopped`).
    pub status: Option<String>,
    /// Items queued (in all slots).
    pub queued: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// WorkerState keys held (all routines).
    pub state_keys: u64,
    /// How far each input was read and committed (input name → position).
    pub inputs: BTreeMap<String, u64>,
    /// The job was paused when it stopped (it starts paused again).
    pub paused: bool,
    /// Retries that were armed (they are armed again, due when they were).
    pub armed_retries: u64,
}

impl JobStore {
    /// Opens the job store in `dir`: creates it (made if missing) with `header` when it holds
    /// none, or recovers the one there (whose header is then the stored one).
    pub fn open(dir: &Path, header: &[u8]) -> Result<JobStore, String> {
        let existed = dir.join(super::store::FILE).exists();
        let (store, recovered) = Store::open(dir, header).map_err(|e| e.to_string())?;
        let resumed = Resumed {
            dir: dir.to_owned(),
            created: !existed,
            header: recovered.header.clone(),
            status: recovered.status.clone(),
            queued: recovered.items.values().map(|v| v.len() as u64).sum(),
            dead_letters: recovered.dead_letters.len() as u64,
            state_keys: recovered.state.len() as u64,
            inputs: recovered.inputs.clone(),
            paused: recovered.paused,
            armed_retries: recovered.retries.len() as u64,
        };
        Ok(JobStore {
            store,
            recovered,
            resumed,
        })
    }

    /// What the store held.
    pub fn resumed(&self) -> &Resumed {
        &self.resumed
    }

    /// Every dead letter the store holds (JSON, in the order they were made).
    pub fn dead_letters(&self) -> impl Iterator<Item = &str> {
        self.recovered.dead_letters.iter().map(|(_, l)| l.as_str())
    }

    /// Every WorkerState value the store holds: (routine index, key, JSON text).
    pub fn state(&self) -> impl Iterator<Item = (u32, &str, &str)> {
        self.recovered
            .state
            .iter()
            .map(|((n, k), v)| (*n, k.as_str(), v.as_str()))
    }

    /// Every queued item the store holds: (routine index, slot index, JSON text).
    pub fn queued(&self) -> impl Iterator<Item = (u32, u32, &str)> {
        self.recovered
            .items
            .iter()
            .flat_map(|((n, s), v)| v.iter().map(move |(_, i)| (*n, *s, i.json_str())))
    }
}
