//! Deadlines that cover blocking host calls.
//!
//! Epoch interruption stops guest *code* at its deadline, but a guest blocked inside a host
//! call (`std::thread::sleep`, `poll` on a clock or a stream) runs no code, so no epoch check
//! can reach it: a one-hour sleep would hold its worker, and `--timeout`, cancel and shutdown
//! would wait for it. Every wait of WASI 0.2 ends in `wasi:io/poll` (`poll`, or a pollable's
//! `block`), so this host shadows those two functions with versions that wait on the same
//! futures in short slices and, between slices, end the wait with a trap when the
//! activation's deadline has passed or its job has halted (failed, cancelled, shut down).
//!
//! The deadline is the activation's own budget (time spent waiting for queue space in `emit`
//! or on the host's output is not charged, as everywhere); outside an activation (instantiation,
//! `describe`) the routine's timeout counts from the Store's creation.

use std::future::Future;
use std::time::{Duration, Instant};

use wasmtime::Trap;
use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::sync::io::poll as sync_poll;
use wasmtime_wasi::runtime::in_tokio;

use super::instance::{Call, StoreData};

/// How often a blocked guest's wait checks its deadline and its job: the most a deadline,
/// a cancel or a shutdown is late for a guest blocked in a host call.
pub(crate) const SLICE: Duration = Duration::from_millis(20);

/// `wasi:io/poll` as a guest of this Store sees it: the Store's table, and the activation it
/// serves (whose deadline bounds every wait).
pub(crate) struct GuardedPoll<'a> {
    table: &'a mut ResourceTable,
    call: Option<&'a mut Call>,
    /// When a wait outside any activation must end.
    fallback: Option<Instant>,
}

/// Selects [`GuardedPoll`] as the host of `wasi:io/poll` in the linker.
pub(crate) struct HasGuardedPoll;

impl HasData for HasGuardedPoll {
    type Data<'a> = GuardedPoll<'a>;
}

impl StoreData {
    pub(crate) fn guarded_poll(&mut self) -> GuardedPoll<'_> {
        let (table, call, fallback) = self.poll_parts();
        GuardedPoll {
            table,
            call,
            fallback,
        }
    }
}

/// Why a wait was cut short.
enum Cut {
    Deadline,
    Halted,
}

/// Waits for `fut` in slices of [`SLICE`], giving up with an interrupt trap at `end` or when
/// `call`'s job halts. A deadline marks the call `timed_out`, so its error says so.
fn wait<T>(
    fut: impl Future<Output = wasmtime::Result<T>>,
    call: Option<&mut Call>,
    fallback: Option<Instant>,
) -> wasmtime::Result<T> {
    let (end, ctx) = match &call {
        Some(c) => (c.deadline(), Some(c.context())),
        None => (fallback, None),
    };
    let outcome = in_tokio(async {
        let mut fut = std::pin::pin!(fut);
        loop {
            if ctx.is_some_and(|c| c.job_halted()) {
                return Err(Cut::Halted);
            }
            let now = Instant::now();
            let slice = match end {
                Some(end) if now >= end => return Err(Cut::Deadline),
                Some(end) => (end - now).min(SLICE),
                None => SLICE,
            };
            if let Ok(r) = tokio::time::timeout(slice, &mut fut).await {
                return Ok(r);
            }
        }
    });
    match outcome {
        Ok(r) => r,
        Err(Cut::Deadline) => {
            if let Some(c) = call {
                c.timed_out = true;
            }
            Err(Trap::Interrupt.into())
        }
        Err(Cut::Halted) => Err(Trap::Interrupt.into()),
    }
}

impl sync_poll::Host for GuardedPoll<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let fut = async_poll::Host::poll(&mut *self.table, pollables);
        wait(fut, self.call.as_deref_mut(), self.fallback)
    }
}

impl sync_poll::HostPollable for GuardedPoll<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // Never blocks: a pollable's readiness now.
        in_tokio(async_poll::HostPollable::ready(&mut *self.table, pollable))
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let fut = async_poll::HostPollable::block(&mut *self.table, pollable);
        wait(fut, self.call.as_deref_mut(), self.fallback)
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(&mut *self.table, pollable)
    }
}
