//! The execution layer: what runs a job. Read it bottom-up:
//!
//! | module | what lives there |
//! | --- | --- |
//! | `scheduler` | the work-stealing pool: threads, deques, sleeping and waking, helping (knows only the [`Run`](scheduler::Run) trait) |
//! | `timer` | the one timer thread: `time_interval` wake-ups and delayed retries |
//! | `queues` | one routine's queues in one job: push, take, byte credit (where a durable store takes over) |
//! | `job` | a job: lifecycle and completion, counters, dead letters, output, reports; the [`Task`](job::Task)s it schedules |
//! | `delivery` | delivery and backpressure: where an emit goes, the full-slot protocol |
//! | `store` | a job's durable store (redb, group commit) |
//! | `durable` | durable jobs: what commits together, recovery, the public [`JobStore`](durable::JobStore) |
//! | `run` | running tasks: drive a routine, run an activation, apply its error strategy, commit an attempt |
//!
//! It builds on the model (`crate::model`) and names nothing of the runtime API above it.

pub(crate) mod delivery;
pub(crate) mod durable;
pub(crate) mod job;
pub(crate) mod queues;
pub(crate) mod run;
pub(crate) mod scheduler;
pub(crate) mod store;
pub(crate) mod timer;
