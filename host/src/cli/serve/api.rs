//! The HTTP API (`/v1`, JSON), on axum. Handlers authenticate the tenant, then call the
//! [`Host`]; whatever blocks (compiling, checking a flow, posting into a full slot) runs on
//! tokio's blocking threads, never on the few HTTP threads.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::host::{ApiError, Host, JobRecord, Tenant};
use crate::Item;

/// The largest flow file a tenant may upload.
const MAX_FLOW_BYTES: usize = 4 << 20;
/// The largest body of a job's start (`{"input": …}`).
const MAX_START_BYTES: usize = 16 << 20;
/// The largest item (one JSON body, or one NDJSON line).
const MAX_ITEM_BYTES: usize = 16 << 20;
/// Failed authentications allowed per client address per minute; more answer 429.
const AUTH_FAILURES_PER_MINUTE: u32 = 20;
/// The most client addresses whose failures are counted at once.
const MAX_FAILING_ADDRESSES: usize = 10_000;

#[derive(Clone)]
pub(crate) struct AppState {
    host: Arc<Host>,
    /// Bounds how many components compile at once (compiling is CPU-heavy).
    compile: Arc<tokio::sync::Semaphore>,
    /// Failed authentications per client address: (window start, count).
    failures: Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        // A body refused part-read (too large, stalled, too slow) leaves the connection
        // unusable: say so, so that the client does not send its next request on it.
        if self.status == 413 || self.status == 408 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == 401 {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"routilux\""),
            );
        }
        r
    }
}

/// The tenant of the request's bearer token.
struct Auth(Arc<Tenant>);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // A valid token is never refused (clients behind one proxy share its address); the
        // failures of an address are what is limited.
        if let Some(t) = token.and_then(|t| state.host.authenticate(t)) {
            return Ok(Auth(t));
        }
        if let Some(ip) = ip {
            let mut f = state.failures.lock();
            if f.len() >= MAX_FAILING_ADDRESSES && !f.contains_key(&ip) {
                f.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
                if f.len() >= MAX_FAILING_ADDRESSES {
                    // Past the bound the limit is let go rather than the memory.
                    f.clear();
                }
            }
            let e = f.entry(ip).or_insert((Instant::now(), 0));
            if e.0.elapsed() >= Duration::from_secs(60) {
                *e = (Instant::now(), 0);
            }
            e.1 += 1;
            if e.1 > AUTH_FAILURES_PER_MINUTE {
                let mut err = ApiError::new(
                    429,
                    "too_many_failures",
                    "too many failed authentications from this address: wait a minute",
                );
                err.retry_after = Some(60 - e.0.elapsed().as_secs().min(59));
                return Err(err);
            }
        }
        Err(ApiError::new(
            401,
            "unauthorized",
            if token.is_some() {
                "the token is not valid"
            } else {
                "give a token: `Authorization: Bearer TOKEN`"
            },
        ))
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, "internal", format!("the request's task failed: {e}")))?
}

/// Bytes of request body a request holds against its tenant's `request_bytes` (permits of
/// the tenant's semaphore), given back when dropped or as they are let go.
struct Held {
    budget: Arc<tokio::sync::Semaphore>,
    /// What a lowered quota still owes (see `Tenant::bodies_debt`): paid from what this
    /// request gives back, by forgetting it.
    debt: Arc<std::sync::atomic::AtomicU64>,
    wait: Duration,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Held {
    fn new(s: &AppState, t: &Tenant) -> Self {
        Held {
            budget: t.bodies.clone(),
            debt: t.bodies_debt.clone(),
            wait: s.host.config.connections.body_timeout,
            permit: None,
        }
    }

    /// Lets `part` go: forgotten as far as a lowered quota is owed, the rest given back.
    fn let_go(&self, mut part: tokio::sync::OwnedSemaphorePermit) {
        let owed = super::host::take_up_to(&self.debt, part.num_permits() as u64) as usize;
        if owed > 0
            && let Some(paid) = part.split(owed)
        {
            paid.forget();
        }
        drop(part);
    }

    /// Takes `n` more bytes, waiting up to the body timeout for them (the body is not read
    /// meanwhile: the client waits on TCP); 503 naming the quota if they do not come.
    async fn take(&mut self, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        let got = tokio::time::timeout(self.wait, self.budget.clone().acquire_many_owned(n32))
            .await
            .ok()
            .and_then(Result::ok);
        let Some(p) = got else {
            let mut e = ApiError::new(
                503,
                "quota_exceeded",
                "the tenant's requests hold their request_bytes quota of request bodies in \
                 memory: send this one when others have ended",
            )
            .with("quota", "request_bytes");
            e.retry_after = Some(1);
            return Err(e);
        };
        match &mut self.permit {
            Some(held) => held.merge(p),
            None => self.permit = Some(p),
        }
        Ok(())
    }

    /// Gives `n` bytes back (their data was let go).
    fn give(&mut self, n: usize) {
        if let Some(held) = &mut self.permit
            && let Some(part) = held.split(n.min(held.num_permits()))
        {
            self.let_go(part);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.let_go(p);
        }
    }
}

/// Reads a whole body of at most `limit` bytes, each piece held against the tenant's
/// `request_bytes` in `held` (kept until `held` is dropped).
async fn read_body(
    body: Body,
    limit: usize,
    what: &str,
    held: &mut Held,
) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "too_large",
            format!(
                "the {what} is larger than {}, the most the server takes",
                crate::model::budget::bytes(limit as u64)
            ),
        )
    };
    let mut body = body;
    let mut out: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(too_large());
            }
            held.take(data.len()).await?;
            out.extend_from_slice(&data);
        }
    }
    Ok(out.into())
}

/// Reads a body to its end (at most `limit` bytes), keeping none of it.
async fn drain_body(body: Body, limit: usize) {
    let mut body = body;
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > limit {
                return;
            }
        }
    }
}

/// A request body that failed to arrive: 408 if it stalled past the server's `body_timeout`
/// or came slower than its `min_body_rate`, else 400.
fn body_error(e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(slow) = s.downcast_ref::<super::listen::SlowBody>() {
            return ApiError::new(408, "body_too_slow", slow.to_string());
        }
        if s.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(
                408,
                "body_timeout",
                "the request body sent nothing for longer than the server's `body_timeout`",
            );
        }
        source = s.source();
    }
    ApiError::bad_request(format!("cannot read the request body: {e}"))
}

/// The OpenAPI document's frame; the paths come from the handlers' `#[utoipa::path]`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "routilux serve",
        description = "One long-running host for many tenants' flows of sandboxed WebAssembly \
                       routines. Every `/v1` request but this document carries `Authorization: \
                       Bearer TOKEN`; a token sees only its tenant's plugins, flows and jobs, and \
                       anything of another tenant answers 404. Errors are `{\"error\": {\"code\", \
                       \"message\", ...}}`."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorDetail, StartDoc)),
    tags(
        (name = "plugins", description = "WebAssembly components, kept per tenant"),
        (name = "flows", description = "Flow files naming the tenant's plugins"),
        (name = "jobs", description = "Durable runs of a flow: input, status, events, results"),
        (name = "tenant", description = "What the tenant uses"),
        (name = "health", description = "Liveness and readiness (no token)"),
    )
)]
struct ApiDoc;

/// Declares the bearer token scheme the operations name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// An error answer (documentation only: answers are made by `ApiError`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct ErrorDetail {
    /// A stable code: `not_found`, `unauthorized`, `quota_exceeded`, `invalid_flow`, `bad_request`, ...
    code: String,
    message: String,
    /// The quota passed, if one was.
    quota: Option<String>,
    /// A flow's located problems (file, line, column, the line's text), as `validate` prints.
    diagnostics: Option<Vec<serde_json::Value>>,
    /// Items taken before the error (item posts).
    accepted: Option<u64>,
}

/// The body of `POST /v1/flows/{id}/jobs` (documentation of [`StartBody`]).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct StartDoc {
    /// Items by `routine.slot`, posted first (instead of the flow file's `input:`).
    input: Option<std::collections::BTreeMap<String, Vec<serde_json::Value>>>,
    /// No more input after these: the job completes once quiescent.
    close: Option<bool>,
}

pub(crate) fn router(host: Arc<Host>) -> Router {
    let state = AppState {
        host,
        compile: Arc::new(tokio::sync::Semaphore::new(2)),
        failures: Arc::default(),
    };
    // One list makes both the routes and the OpenAPI document: they cannot drift apart.
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(usage))
        .routes(routes!(list_plugins))
        .routes(routes!(get_plugin, put_plugin, delete_plugin))
        .routes(routes!(list_flows))
        .routes(routes!(get_flow, put_flow, delete_flow))
        .routes(routes!(start_job))
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(post_items))
        .routes(routes!(close_job))
        .routes(routes!(cancel_job))
        .routes(routes!(pause_job))
        .routes(routes!(resume_job))
        .routes(routes!(job_state))
        .routes(routes!(job_output))
        .routes(routes!(job_events))
        .routes(routes!(job_dead_letters))
        .split_for_parts();
    let doc = Arc::new(doc);
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc) }
            }),
        )
        .fallback(|| async { ApiError::new(404, "not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn(read_small_bodies))
        // Bodies are read by the handlers, each with its own limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The most a body is read before routing, when its length says it is small.
const SMALL_BODY: u64 = 64 << 10;

/// Reads a small body (by its `Content-Length`) whole before the handler runs, so that an
/// answer that ignores the body (an error, an endpoint that takes none) still leaves the
/// connection usable for the client's next request. Larger and streamed bodies are read by
/// their handlers.
async fn read_small_bodies(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let small = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= SMALL_BODY);
    if !small {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, SMALL_BODY as usize).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(e) => body_error(&e).into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    summary = "The server is alive",
    responses((status = 200, description = "Alive", body = serde_json::Value)),
)]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    summary = "The server takes work",
    responses(
        (status = 200, description = "Ready", body = serde_json::Value),
        (status = 503, description = "Starting, stopping, or its storage fails (with the reason)", body = serde_json::Value),
    ),
)]
async fn readyz(State(s): State<AppState>) -> Response {
    match s.host.readiness() {
        Ok(()) => Json(json!({"ready": true})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": why})),
        )
            .into_response(),
    }
}

fn created(new: bool, v: Value) -> Response {
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(v)).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "tenant",
    summary = "The tenant's weight, the worker time its activations took, and what it holds against each quota",
    responses(
        (status = 200, description = "Its usage", body = serde_json::Value),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn usage(State(s): State<AppState>, Auth(t): Auth) -> Json<Value> {
    Json(s.host.usage(&t))
}

#[utoipa::path(
    get,
    path = "/v1/plugins",
    tag = "plugins",
    summary = "The tenant's plugins",
    responses(
        (status = 200, description = "Each plugin: name, SHA-256, size, kinds", body = serde_json::Value),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list_plugins(State(s): State<AppState>, Auth(t): Auth) -> Json<Value> {
    Json(s.host.plugins(&t))
}

#[utoipa::path(
    get,
    path = "/v1/plugins/{name}",
    tag = "plugins",
    summary = "A plugin: its kinds, slots, events and imports (what `inspect --json` shows)",
    params(
        ("name" = String, Path, description = "The plugin's name: 1 to 64 letters, digits, `_` and `-`"),
    ),
    responses(
        (status = 200, description = "The plugin", body = serde_json::Value),
        (status = 404, description = "No such plugin (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get_plugin(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.host.plugin(&t, &name).map(Json)
}

#[utoipa::path(
    put,
    path = "/v1/plugins/{name}",
    tag = "plugins",
    summary = "Uploads a component: validated, compiled once per content hash, stored; a new version rebuilds the flows using it",
    params(
        ("name" = String, Path, description = "The plugin's name: 1 to 64 letters, digits, `_` and `-`"),
    ),
    request_body(content = String, content_type = "application/wasm", description = "The component's bytes (at most the tenant's `plugin_bytes`)"),
    responses(
        (status = 200, description = "Replaced", body = serde_json::Value),
        (status = 201, description = "Stored", body = serde_json::Value),
        (status = 400, description = "Not a component routilux can run", body = ErrorBody),
        (status = 409, description = "The new version would break flows (named, with their diagnostics)", body = ErrorBody),
        (status = 413, description = "Past the `plugin_bytes` quota", body = ErrorBody),
        (status = 429, description = "Past the `plugins` quota", body = ErrorBody),
        (status = 507, description = "Past the `disk_bytes` quota, or the disk is full", body = ErrorBody),
        (status = 503, description = "Past the `request_bytes` quota: the tenant's requests hold as much request body as it may (`Retry-After`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn put_plugin(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    // A count quota answers before the component is checked (the body is still read, so
    // that the client's connection stays usable); the body is read up to the byte quota.
    let quota = t.quotas().plugin_bytes;
    let limit = quota.min(crate::wasm::MAX_COMPONENT_BYTES);
    if let Err(e) = s.host.plugin_room(&t, &name) {
        drain_body(body, usize::try_from(limit).unwrap_or(usize::MAX)).await;
        return Err(e);
    }
    let mut held = Held::new(&s, &t);
    let bytes = read_body(
        body,
        usize::try_from(limit).unwrap_or(usize::MAX),
        "component",
        &mut held,
    )
    .await
    .map_err(|e| {
        if e.status == 413 && limit == quota {
            ApiError::new(
                413,
                "quota_exceeded",
                format!(
                    "the component is larger than the tenant's plugin_bytes quota ({})",
                    crate::model::budget::bytes(quota)
                ),
            )
            .with("quota", "plugin_bytes")
        } else {
            e
        }
    })?;
    let _permit = s
        .compile
        .acquire()
        .await
        .map_err(|_| ApiError::new(503, "stopping", "the server is stopping"))?;
    let host = s.host.clone();
    let (new, v) = blocking(move || host.put_plugin(&t, &name, &bytes)).await?;
    Ok(created(new, v))
}

#[utoipa::path(
    delete,
    path = "/v1/plugins/{name}",
    tag = "plugins",
    summary = "Deletes a plugin",
    params(
        ("name" = String, Path, description = "The plugin's name: 1 to 64 letters, digits, `_` and `-`"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such plugin (of this tenant)", body = ErrorBody),
        (status = 409, description = "Flows use it (named)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn delete_plugin(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let host = s.host.clone();
    blocking(move || host.delete_plugin(&t, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/flows",
    tag = "flows",
    summary = "The tenant's flows",
    responses(
        (status = 200, description = "Each flow", body = serde_json::Value),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list_flows(State(s): State<AppState>, Auth(t): Auth) -> Json<Value> {
    Json(s.host.flows(&t))
}

#[utoipa::path(
    get,
    path = "/v1/flows/{id}",
    tag = "flows",
    summary = "A flow: its file and what it runs",
    params(
        ("id" = String, Path, description = "The flow's id"),
    ),
    responses(
        (status = 200, description = "The flow", body = serde_json::Value),
        (status = 404, description = "No such flow (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get_flow(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.host.flow(&t, &id).map(Json)
}

#[utoipa::path(
    put,
    path = "/v1/flows/{id}",
    tag = "flows",
    summary = "Stores a flow file (YAML or JSON; `plugin:` names the tenant's plugins), checked whole, for new jobs",
    params(
        ("id" = String, Path, description = "The flow's id"),
    ),
    request_body(content = String, content_type = "application/yaml", description = "A flow file, at most 4 MiB"),
    responses(
        (status = 200, description = "Replaced", body = serde_json::Value),
        (status = 201, description = "Stored", body = serde_json::Value),
        (status = 400, description = "The flow does not hold: located diagnostics, as `validate` prints them", body = ErrorBody),
        (status = 429, description = "Past the `flows` quota", body = ErrorBody),
        (status = 507, description = "Past the `disk_bytes` quota, or the disk is full", body = ErrorBody),
        (status = 503, description = "Past the `request_bytes` quota: the tenant's requests hold as much request body as it may (`Retry-After`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn put_flow(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut held = Held::new(&s, &t);
    let bytes = read_body(body, MAX_FLOW_BYTES, "flow file", &mut held).await?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|e| ApiError::bad_request(format!("the flow file is not UTF-8: {e}")))?;
    let host = s.host.clone();
    let (new, v) = blocking(move || host.put_flow(&t, &id, text)).await?;
    Ok(created(new, v))
}

#[utoipa::path(
    delete,
    path = "/v1/flows/{id}",
    tag = "flows",
    summary = "Deletes a flow",
    params(
        ("id" = String, Path, description = "The flow's id"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such flow (of this tenant)", body = ErrorBody),
        (status = 409, description = "Jobs of it run (named)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn delete_flow(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let host = s.host.clone();
    blocking(move || host.delete_flow(&t, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    /// Items by `routine.slot`, posted first (instead of the flow file's `input:`).
    #[serde(default)]
    input: Option<serde_json::Map<String, Value>>,
    /// No more input after these: the job completes once quiescent.
    #[serde(default)]
    close: bool,
}

#[utoipa::path(
    post,
    path = "/v1/flows/{id}/jobs",
    tag = "jobs",
    summary = "Starts a durable job of the flow, open for input until closed",
    params(
        ("id" = String, Path, description = "The flow's id"),
    ),
    request_body(content = StartDoc, content_type = "application/json", description = "Optional: items by `routine.slot` (else the flow file's `input:`), and whether to close it"),
    responses(
        (status = 201, description = "The job, with its unguessable id", body = serde_json::Value),
        (status = 400, description = "A bad input", body = ErrorBody),
        (status = 404, description = "No such flow (of this tenant)", body = ErrorBody),
        (status = 429, description = "Past the `jobs` quota, or a slot stayed full", body = ErrorBody),
        (status = 507, description = "Past the `disk_bytes` quota, or the disk is full", body = ErrorBody),
        (status = 503, description = "Past the `request_bytes` quota: the tenant's requests hold as much request body as it may (`Retry-After`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn start_job(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(flow): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut held = Held::new(&s, &t);
    let bytes = read_body(body, MAX_START_BYTES, "request", &mut held).await?;
    let start: StartBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the request body: {e}")))?
    };
    let host = s.host.clone();
    let job = blocking(move || host.start_job(&t, &flow, start.input, start.close)).await?;
    Ok((StatusCode::CREATED, Json(job.view())).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    summary = "The tenant's jobs",
    responses(
        (status = 200, description = "Each job's status", body = serde_json::Value),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list_jobs(State(s): State<AppState>, Auth(t): Auth) -> Json<Value> {
    Json(s.host.jobs(&t))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "A job: status, paused, items posted, what a restart found in its store, and the summary `run --json` prints",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get_job(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.host.job(&t, &id)?.view()))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/close",
    tag = "jobs",
    summary = "No more input: the job completes once quiescent",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn close_job(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = s.host.job(&t, &id)?;
    let j = job.clone();
    blocking(move || j.close()).await?;
    Ok(Json(job.view()))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    summary = "Cancels the job",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn cancel_job(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = s.host.job(&t, &id)?;
    job.cancel();
    Ok(Json(job.view()))
}

/// `POST /v1/jobs/{id}/pause`: no new activation (the running ones end), queues kept, posts
/// still taken within the bounds; the job does not finish while paused, and stays paused
/// across a restart.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/pause",
    tag = "jobs",
    summary = "No new activation (queues kept, posts still taken within the bounds); stays paused across a restart",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn pause_job(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = s.host.job(&t, &id)?;
    job.live()?.pause();
    Ok(Json(job.view()))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/resume",
    tag = "jobs",
    summary = "Resumes a paused job",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn resume_job(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = s.host.job(&t, &id)?;
    job.live()?.resume();
    Ok(Json(job.view()))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/state",
    tag = "jobs",
    summary = "Each routine's WorkerState",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The state by routine", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn job_state(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.host.job(&t, &id)?.state()))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/output",
    tag = "jobs",
    summary = "The job's output lines (within its output budget)",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The lines", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn job_output(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.host.job(&t, &id)?.output()))
}

#[derive(Deserialize)]
struct EventsQuery {
    /// The number of the last event seen (as `Last-Event-ID`).
    after: Option<u64>,
}

/// `GET /v1/jobs/{id}/events`: server-sent events, from after `Last-Event-ID` (or `?after=N`):
/// `output` (a line a routine printed or logged), `activations` (counters per routine),
/// `error` (an activation's failure), `status` (running, paused, and the final one, after
/// which the stream ends), and `dropped` (how many events were past the job's bound before
/// the reader came back). A keep-alive comment every 15 s.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    summary = "Server-sent events: `output`, `activations`, `error`, `status` (the last one ends the stream), `dropped`; numbered, resumable with `Last-Event-ID`",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("after" = Option<u64>, Query, description = "Resume after this event number (as `Last-Event-ID`)"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event number"),
    ),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn job_events(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let job = s.host.job(&t, &id)?;
    let seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(q.after)
        .unwrap_or(0);
    let events = job.events.clone();
    let pending: std::collections::VecDeque<Event> = Default::default();
    let stream = futures_util::stream::unfold(
        (events, seen, pending),
        |(events, mut seen, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop_front() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(e),
                        (events, seen, pending),
                    ));
                }
                match events.next(seen).await {
                    super::events::Next::End => return None,
                    super::events::Next::Wait => {}
                    super::events::Next::Some {
                        dropped,
                        events: batch,
                    } => {
                        if dropped > 0 {
                            pending.push_back(
                                Event::default()
                                    .event("dropped")
                                    .data(json!({ "dropped": dropped }).to_string()),
                            );
                        }
                        for e in batch {
                            seen = e.id;
                            pending.push_back(
                                Event::default()
                                    .id(e.id.to_string())
                                    .event(e.kind)
                                    .data(e.data),
                            );
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/dead-letters",
    tag = "jobs",
    summary = "The job's dead letters: failed batches, their items and why",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The dead letters", body = serde_json::Value),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn job_dead_letters(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.host.job(&t, &id)?.dead_letters()))
}

#[derive(Deserialize)]
struct ItemsQuery {
    /// The target slot (`routine.slot`); optional when the flow has one entry slot.
    to: Option<String>,
}

/// Posts `items` on a blocking thread; `accepted` grows by what was taken.
async fn post_batch(
    s: &AppState,
    job: &Arc<JobRecord>,
    to: &Option<String>,
    items: Vec<Item>,
    accepted: &mut usize,
) -> Result<(), ApiError> {
    if items.is_empty() {
        return Ok(());
    }
    let (host, job, to) = (s.host.clone(), job.clone(), to.clone());
    let before = *accepted;
    match blocking(move || host.post(&job, to.as_deref(), items)).await {
        Ok(n) => {
            *accepted += n;
            Ok(())
        }
        Err(mut e) => {
            let n = e
                .details
                .get("accepted")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
            *accepted = before + n;
            e.details.insert("accepted".into(), (*accepted).into());
            Err(e)
        }
    }
}

/// `POST /v1/jobs/{id}/items`: one JSON item, or an NDJSON body (`Content-Type:
/// application/x-ndjson`) streamed in: lines are posted as they arrive, each waiting for room
/// (backpressure). A slot full past the post timeout answers 429 with `accepted`, the number of
/// items taken (a client resends exactly the rest); so does a bad line (400, with its line
/// number). Nothing taken is dropped.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/items",
    tag = "jobs",
    summary = "Posts one JSON item, or an NDJSON body streamed in with backpressure; answers once the items are committed",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("to" = Option<String>, Query, description = "The target slot, `routine.slot` (optional when the flow has one entry slot)"),
    ),
    request_body(
        content(
            (serde_json::Value = "application/json"),
            (String = "application/x-ndjson")
        ),
        description = "One item (a JSON object), or NDJSON: one per line"
    ),
    responses(
        (status = 200, description = "`accepted`: the number of items taken", body = serde_json::Value),
        (status = 400, description = "A bad item or line (with its `line` and `accepted`)", body = ErrorBody),
        (status = 404, description = "No such job (of this tenant)", body = ErrorBody),
        (status = 409, description = "The job is closed or finished", body = ErrorBody),
        (status = 429, description = "A slot stayed full past the post timeout: `accepted` says how many were taken, `Retry-After` when to resend the rest", body = ErrorBody),
        (status = 507, description = "Past the `disk_bytes` quota, or the disk is full (with `accepted`)", body = ErrorBody),
        (status = 503, description = "Past the `request_bytes` quota: the tenant's requests hold as much request body as it may (`Retry-After`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one", body = ErrorBody),
        (status = 429, description = "Too many failed tokens from this address: wait a minute", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn post_items(
    State(s): State<AppState>,
    Auth(t): Auth,
    Path(id): Path<String>,
    Query(q): Query<ItemsQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let job = s.host.job(&t, &id)?;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| {
            let c = c.split(';').next().unwrap_or("").trim();
            c == "application/x-ndjson" || c == "application/jsonl" || c == "application/jsonlines"
        });
    let mut accepted = 0usize;
    let mut held = Held::new(&s, &t);
    if !ndjson {
        let bytes = read_body(body, MAX_ITEM_BYTES, "item", &mut held).await?;
        let item = parse_item(&bytes, None)?;
        post_batch(&s, &job, &q.to, vec![item], &mut accepted).await?;
        return Ok(Json(json!({"accepted": accepted})));
    }
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut line_no = 0u64;
    let mut scanned = 0usize;
    loop {
        let frame = body.frame().await;
        let done = frame.is_none();
        match frame {
            None => {}
            Some(Err(e)) => {
                return Err(body_error(&e).with("accepted", accepted));
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    held.take(data.len())
                        .await
                        .map_err(|e| e.with("accepted", accepted))?;
                    buf.extend_from_slice(&data);
                }
            }
        }
        let mut items = Vec::new();
        let mut start = 0;
        // The unfinished line is not scanned again for each piece of it that arrives.
        let mut from = scanned;
        let mut bad = None;
        while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
            let end = from + i;
            let line = &buf[start..end];
            start = end + 1;
            from = start;
            line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_item(line, Some(line_no)) {
                Ok(item) => items.push(item),
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        buf.drain(..start);
        held.give(start);
        scanned = buf.len();
        if done && bad.is_none() && !buf.iter().all(u8::is_ascii_whitespace) {
            line_no += 1;
            match parse_item(&buf, Some(line_no)) {
                Ok(item) => items.push(item),
                Err(e) => bad = Some(e),
            }
            buf.clear();
        }
        post_batch(&s, &job, &q.to, items, &mut accepted).await?;
        if let Some(e) = bad {
            return Err(e.with("accepted", accepted));
        }
        if buf.len() > MAX_ITEM_BYTES {
            return Err(ApiError::new(
                413,
                "item_too_large",
                format!(
                    "line {} is longer than {}, the most an item may be",
                    line_no + 1,
                    crate::model::budget::bytes(MAX_ITEM_BYTES as u64)
                ),
            )
            .with("accepted", accepted)
            .with("line", line_no + 1));
        }
        if done {
            break;
        }
    }
    Ok(Json(json!({"accepted": accepted})))
}

fn parse_item(bytes: &[u8], line: Option<u64>) -> Result<Item, ApiError> {
    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
    let with_line = |e: ApiError| match line {
        Some(l) => e.with("line", l),
        None => e,
    };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| with_line(ApiError::bad_request(format!("{at}not JSON: {e}"))))?;
    Item::new(value).map_err(|e| with_line(ApiError::bad_request(format!("{at}{e}"))))
}
