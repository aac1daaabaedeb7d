//! A job's event log for `GET /v1/jobs/{id}/events` (server-sent events): output lines,
//! activation counts, errors and status changes, each with a number, kept within a bound so
//! that a client reconnecting with `Last-Event-ID` gets what it missed (or is told how many
//! events were dropped before it came back).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Value, json};

/// The most events a job keeps for late or reconnecting readers.
const MAX_EVENTS: usize = 10_000;
/// The most bytes of event data a job keeps.
const MAX_EVENT_BYTES: usize = 8 << 20;

/// One event: its number, its kind, its JSON data.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub id: u64,
    pub kind: &'static str,
    pub data: String,
}

#[derive(Default)]
struct Log {
    /// The number of the next event (the first is 1).
    next: u64,
    events: VecDeque<Event>,
    bytes: usize,
    /// The job finished: no event follows the last.
    closed: bool,
}

/// A job's events.
#[derive(Default)]
pub(crate) struct Events {
    log: Mutex<Log>,
    notify: tokio::sync::Notify,
}

/// What a reader gets after the event it saw last.
pub(crate) enum Next {
    /// Events to send; `dropped` were past the bound before the reader came back.
    Some { dropped: u64, events: Vec<Event> },
    /// Nothing yet: wait.
    Wait,
    /// The log is closed and the reader has everything.
    End,
}

impl Events {
    pub fn new() -> Arc<Self> {
        let e = Arc::new(Self::default());
        e.log.lock().next = 1;
        e
    }

    /// Appends an event (from any thread; never blocks on readers).
    pub fn push(&self, kind: &'static str, data: Value) {
        let data = data.to_string();
        {
            let mut log = self.log.lock();
            if log.closed {
                return;
            }
            let id = log.next;
            log.next += 1;
            log.bytes += data.len();
            log.events.push_back(Event { id, kind, data });
            while log.events.len() > MAX_EVENTS || log.bytes > MAX_EVENT_BYTES {
                match log.events.pop_front() {
                    Some(e) => log.bytes -= e.data.len(),
                    None => break,
                }
            }
        }
        self.notify.notify_waiters();
    }

    /// Pushes the final status and closes the log.
    pub fn close(&self, status: Value) {
        self.push("status", json!({ "status": status }));
        self.log.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// Ends every reader's stream (the server is stopping), with no event.
    pub fn end(&self) {
        self.log.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// Keeps only the last event (a finished job's final status).
    pub fn shrink(&self) {
        let mut log = self.log.lock();
        while log.events.len() > 1 {
            if let Some(e) = log.events.pop_front() {
                log.bytes -= e.data.len();
            }
        }
        log.events.shrink_to_fit();
    }

    fn after(&self, seen: u64) -> Next {
        let log = self.log.lock();
        let first = log.events.front().map_or(log.next, |e| e.id);
        let events: Vec<Event> = log
            .events
            .iter()
            .filter(|e| e.id > seen)
            .take(256)
            .cloned()
            .collect();
        if events.is_empty() {
            return if log.closed { Next::End } else { Next::Wait };
        }
        Next::Some {
            dropped: first.saturating_sub(seen + 1),
            events,
        }
    }

    /// The events after `seen`, waiting for some if there are none yet.
    pub async fn next(&self, seen: u64) -> Next {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.after(seen) {
                Next::Wait => notified.await,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_gets_what_it_missed_and_is_told_what_was_dropped() {
        let e = Events::new();
        for i in 0..(MAX_EVENTS + 5) {
            e.push("output", json!(i));
        }
        match e.after(0) {
            Next::Some { dropped, events } => {
                assert_eq!(dropped, 5);
                assert_eq!(events[0].id, 6);
            }
            _ => panic!("events"),
        }
        match e.after(MAX_EVENTS as u64 + 4) {
            Next::Some { dropped, events } => {
                assert_eq!(dropped, 0);
                assert_eq!(events.len(), 1);
            }
            _ => panic!("one event"),
        }
        assert!(matches!(e.after(MAX_EVENTS as u64 + 5), Next::Wait));
        e.close(json!("completed"));
        assert!(matches!(e.after(MAX_EVENTS as u64 + 5), Next::Some { .. }));
        assert!(matches!(e.after(MAX_EVENTS as u64 + 6), Next::End));
    }
}
