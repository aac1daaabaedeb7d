//! The server's connections: accepted here (not by `axum::serve`, which sets no header
//! timeout and no limit), each served by hyper's HTTP/1 with
//! - a header timeout: a client has `header_timeout` to send a request's headers, counted from
//!   the connection's start or from the end of its previous response, so a slow-loris client
//!   and an idle keep-alive connection are both closed after it;
//! - request heads of at most [`MAX_HEAD`] bytes (431 past it);
//! - a body timeout: a request body that sends nothing for `body_timeout` (between two of its
//!   pieces) fails its request (408, see the API's body reading) and the connection closes, so
//!   a client dripping a body cannot hold a connection and a handler for ever;
//! - a least body rate: a request body averaging fewer than `min_body_rate` bytes a second
//!   over the time the server waits for it (after a grace) fails the same way (see
//!   [`RateBody`]), so one trickling a byte within each `body_timeout` cannot either;
//! - at most `max` connections open at once and `per_address` from one IP address: one more is
//!   answered 503 (`too_many_connections`, with `Retry-After`) and closed at once, so one
//!   client cannot hold every descriptor;
//! - a failed accept (out of descriptors, say) logged and retried after a pause, never fatal.
//!
//! On stop no connection is taken any more, idle ones close, and requests in flight get
//! [`STOP_GRACE`] to end.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use super::config::Connections;

/// The most bytes of a request's start line and headers.
pub(crate) const MAX_HEAD: usize = 64 << 10;

/// How long requests in flight get once the server stops.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after a failed accept.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// The connections open now: in all and by address.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A connection's place among the open ones, given back when it is dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock();
        o.total -= 1;
        if let Some(n) = o.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.by_address.remove(&self.ip);
            }
        }
    }
}

/// Takes a place for a connection from `ip`, or says which limit it is past.
fn admit(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &Connections) -> Result<Slot, &'static str> {
    let mut o = open.lock();
    if o.total >= limits.max {
        return Err("the server holds as many connections as it takes");
    }
    let mine = o.by_address.get(&ip).copied().unwrap_or(0);
    if mine >= limits.per_address {
        return Err("your address holds as many connections as one address may");
    }
    o.total += 1;
    *o.by_address.entry(ip).or_default() += 1;
    Ok(Slot {
        open: open.clone(),
        ip,
    })
}

/// The answer to a connection past a limit, written without waiting (a client that does not
/// read it just sees the connection close).
fn refusal(why: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": {"code": "too_many_connections", "message": format!("{why}: retry later")}
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `stop` resolves, then lets requests in flight end (up to
/// [`STOP_GRACE`]); `stopping` runs first (it ends the event streams).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Connections,
    stop: impl Future<Output = ()>,
    stopping: impl FnOnce(),
) {
    let open = Arc::new(Mutex::new(Open::default()));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD.max(8192));
    let mut refused: u64 = 0;
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let slot = match admit(&open, peer.ip(), &limits) {
            Ok(s) => s,
            Err(why) => {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(peer = %peer, refused, "refused a connection: {why}");
                }
                let _ = stream.try_write(&refusal(why));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let (body_timeout, min_rate) = (limits.body_timeout, limits.min_body_rate);
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(
                req.map(|b| Body::new(TimeoutBody::new(body_timeout, RateBody::new(b, min_rate)))),
            )
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, "connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    stopping();
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        errln!(
            "routilux serve: requests still open after {} s are cut",
            STOP_GRACE.as_secs()
        );
    }
}

/// A request body held to a least rate, as a token bucket: the time the server waits for
/// the body (polls left pending) costs `min_rate` bytes a second, what arrives pays it back,
/// and the credit is capped at what [`BODY_RATE_GRACE`](super::config::BODY_RATE_GRACE) of
/// waiting costs (and starts there). So a server holding off reading (a full slot, a spent
/// quota) never counts against the client, and bytes sent early buy no more than the grace
/// of trickling later. A frame that leaves the credit below zero ends the body with
/// [`SlowBody`]. Checked as frames arrive: the body timeout bounds the wait for the next one.
pub(crate) struct RateBody<B> {
    inner: B,
    min_rate: u64,
    grace: Duration,
    /// Bytes ahead of the rate.
    credit: f64,
    since: Option<std::time::Instant>,
}

impl<B> RateBody<B> {
    pub(crate) fn new(inner: B, min_rate: u64) -> Self {
        Self {
            inner,
            min_rate,
            grace: super::config::BODY_RATE_GRACE,
            credit: min_rate as f64 * super::config::BODY_RATE_GRACE.as_secs_f64(),
            since: None,
        }
    }

    /// Settles a frame of `bytes` that came after `waited`: whether the body is now too slow.
    fn too_slow(&mut self, waited: Duration, bytes: u64) -> bool {
        if self.min_rate == 0 {
            return false;
        }
        let rate = self.min_rate as f64;
        let cap = rate * self.grace.as_secs_f64();
        self.credit = (self.credit - rate * waited.as_secs_f64() + bytes as f64).min(cap);
        self.credit < 0.0
    }
}

/// A request body that came slower than the server's `min_body_rate`.
#[derive(Debug)]
pub(crate) struct SlowBody {
    pub(crate) min_rate: u64,
}

impl std::fmt::Display for SlowBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body came slower than the server's `min_body_rate` of {}/s",
            crate::model::budget::bytes(self.min_rate)
        )
    }
}

impl std::error::Error for SlowBody {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> hyper::body::Body for RateBody<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use hyper::body::Buf;
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        let now = std::time::Instant::now();
        let Poll::Ready(frame) = polled else {
            this.since.get_or_insert(now);
            return Poll::Pending;
        };
        let waited = this
            .since
            .take()
            .map_or(Duration::ZERO, |since| now - since);
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                let bytes = frame.data_ref().map_or(0, |d| d.remaining() as u64);
                if this.too_slow(waited, bytes) {
                    Some(Err(Box::new(SlowBody {
                        min_rate: this.min_rate,
                    })))
                } else {
                    Some(Ok(frame))
                }
            }
            Some(Err(e)) => Some(Err(e.into())),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::{Body as _, Bytes, Frame};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body whose next piece is always there (its client sent it long ago), or, if
    /// `pending`, not there at the first poll of each piece.
    struct Pieces {
        pending: bool,
        asked: bool,
    }

    impl hyper::body::Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.pending && !self.asked {
                self.asked = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.asked = false;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"0123456789")))))
        }
    }

    /// Polls `body` until it gives a frame or an error: whether it was an error.
    fn next_fails(body: &mut RateBody<Pieces>, wait_on_client: Duration) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Pending => std::thread::sleep(wait_on_client),
                Poll::Ready(Some(r)) => return r.is_err(),
                Poll::Ready(None) => unreachable!(),
            }
        }
    }

    /// Time the server holds off reading (backpressure) never counts against the client;
    /// time it waits on a client sending ten bytes a piece does.
    #[test]
    fn only_the_time_spent_waiting_on_the_client_counts() {
        let rated = |pending| {
            let mut b = RateBody::new(
                Pieces {
                    pending,
                    asked: false,
                },
                1_000,
            );
            b.grace = Duration::from_millis(50);
            b.credit = 50.0;
            b
        };
        let mut held_back = rated(false);
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(40));
            assert!(!next_fails(&mut held_back, Duration::ZERO));
        }
        let mut trickling = rated(true);
        let failed = (0..8).position(|_| next_fails(&mut trickling, Duration::from_millis(40)));
        // 10 bytes a 40 ms wait is 250 B/s: the 50 bytes of credit go within three pieces.
        assert!(matches!(failed, Some(0..=3)), "{failed:?}");
        // Bytes sent early buy no more than the grace: a fast start, then a trickle.
        let mut banked = rated(false);
        for _ in 0..1_000 {
            assert!(!next_fails(&mut banked, Duration::ZERO));
        }
        banked.inner.pending = true;
        let failed = (0..8).position(|_| next_fails(&mut banked, Duration::from_millis(40)));
        assert!(matches!(failed, Some(0..=3)), "{failed:?}");
    }
}
