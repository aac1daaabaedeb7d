//! Captured guest stdout/stderr: WASI streams that append to a buffer the host drains into
//! the output of the job and routine an instance is serving.
//!
//! While an activation runs, every complete line is forwarded as soon as it is written (so
//! output streams as it happens, in order with the routine's emits), within the activation's
//! output budget (see [`Context::output`]: past it, lines are not kept and the activation
//! fails). A guest that floods its output cannot grow host memory without bound: past
//! [`MAX_PENDING`] bytes of an unfinished line, further bytes are dropped and counted, and the
//! next drain says how many.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::model::context::Context;

type TaskContext<'a> = std::task::Context<'a>;

/// Most bytes kept between two drains.
pub(crate) const MAX_PENDING: usize = 1 << 20;

/// How many recent lines a capture remembers (to explain a trap: a Rust panic message).
const TAIL: usize = 8;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
    /// Where complete lines go as soon as they are written: the activation being served.
    sink: Option<Context>,
    tail: VecDeque<String>,
}

/// One captured stream (clones share the buffer).
#[derive(Clone)]
pub(crate) struct Capture {
    stream: &'static str,
    buf: Arc<Mutex<Buffer>>,
    /// Nanoseconds spent handing lines on (to a terminal that may be slow or paused): the
    /// Store does not charge them to the guest's deadline.
    waited: Arc<AtomicU64>,
}

impl Capture {
    /// A capture of the guest's `stream` (`stdout` or `stderr`), adding the time it spends
    /// forwarding lines to `waited`.
    pub(crate) fn new(stream: &'static str, waited: Arc<AtomicU64>) -> Self {
        Self {
            stream,
            buf: Arc::default(),
            waited,
        }
    }

    /// Sends lines to `ctx`'s job from now on (`None`: keep them until the next drain).
    pub(crate) fn attach(&self, ctx: Option<Context>) {
        self.buf.lock().sink = ctx;
    }

    /// Starts an activation's output: forgets what an earlier activation left (its pending
    /// bytes and its tail) and sends new lines to `ctx`. One lock.
    pub(crate) fn begin(&self, ctx: Context) {
        let mut b = self.buf.lock();
        b.bytes.clear();
        b.dropped = 0;
        b.tail.clear();
        b.sink = Some(ctx);
    }

    /// Ends an activation's output: forwards what is left (a last line without a newline,
    /// notes of dropped output) and detaches. The common case, nothing left, takes one lock.
    pub(crate) fn finish(&self) {
        {
            let mut b = self.buf.lock();
            if b.bytes.is_empty() && b.dropped == 0 {
                b.sink = None;
                return;
            }
        }
        self.drain(true);
        self.attach(None);
    }

    fn append(&self, data: &[u8]) {
        let mut b = self.buf.lock();
        let room = MAX_PENDING.saturating_sub(b.bytes.len());
        let kept = data.len().min(room);
        b.bytes.extend_from_slice(&data[..kept]);
        b.dropped += data.len() - kept;
        let full = b.bytes.len() >= MAX_PENDING;
        if b.sink.is_some() && (full || data.contains(&b'\n')) {
            drop(b);
            // A line too long to keep is cut here rather than silencing what follows.
            self.drain(full);
        }
    }

    /// Forwards the complete lines written so far (and the unfinished last one if `all`) to
    /// the attached activation; without one, they are discarded (output of `describe`).
    pub(crate) fn drain(&self, all: bool) {
        let (lines, dropped) = self.take_lines(all);
        let mut b = self.buf.lock();
        for l in &lines {
            if b.tail.len() == TAIL {
                b.tail.pop_front();
            }
            b.tail.push_back(l.clone());
        }
        let Some(ctx) = b.sink.as_ref().map(Context::handle) else {
            return;
        };
        drop(b);
        let started = Instant::now();
        for line in lines {
            ctx.output(self.stream, line);
        }
        if dropped > 0 {
            ctx.output(
                self.stream,
                format!("[{dropped} bytes of output dropped: a line too long to keep]"),
            );
        }
        let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited.fetch_add(waited, Ordering::Relaxed);
    }

    /// The last lines written (most recent last), and forgets them.
    pub(crate) fn take_tail(&self) -> Vec<String> {
        self.buf.lock().tail.drain(..).collect()
    }

    /// Takes the complete lines written so far (and the unfinished last line too if `all`),
    /// plus how many bytes were dropped since the last drain.
    fn take_lines(&self, all: bool) -> (Vec<String>, usize) {
        let mut b = self.buf.lock();
        let end = if all {
            b.bytes.len()
        } else {
            b.bytes
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |i| i + 1)
        };
        let taken: Vec<u8> = b.bytes.drain(..end).collect();
        let dropped = std::mem::take(&mut b.dropped);
        drop(b);
        let text = String::from_utf8_lossy(&taken);
        let lines = text
            .split_terminator('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
            .collect();
        (lines, dropped)
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_floods_are_capped() {
        let c = Capture::new("stdout", Arc::default());
        c.append(b"one\ntwo\r\nthr");
        assert_eq!(c.take_lines(false), (vec!["one".into(), "two".into()], 0));
        c.append(b"ee");
        assert_eq!(c.take_lines(true), (vec!["three".into()], 0));
        c.append(&vec![b'x'; MAX_PENDING + 10]);
        let (lines, dropped) = c.take_lines(true);
        assert_eq!((lines[0].len(), dropped), (MAX_PENDING, 10));
    }
}
