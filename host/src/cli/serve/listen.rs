//! The server's connections: accepted here (not by `axum::serve`, which sets no header
//! timeout and no limit), each served by hyper's HTTP/1 with
//! - a header timeout: a client has `header_timeout` to send a request's headers, counted from
//!   the connection's start or from the end of its previous response, so a slow-loris client
//!   and an idle keep-alive connection are both closed after it;
//! - request heads of at most [`MAX_HEAD`] bytes (431 past it);
//! - a body timeout: a request body that sends nothing for `body_timeout` (between two of its
//!   pieces) fails its request (408, see the API's body reading) and the connection closes, so
//!   a client dripping a body cannot hold a connection and a handler for ever;
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
        let body_timeout = limits.body_timeout;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone()
                .oneshot(req.map(|b| Body::new(TimeoutBody::new(body_timeout, b))))
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
