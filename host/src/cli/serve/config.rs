//! `routilux serve`'s configuration: where it listens, its data directory, its tenants and
//! their quotas. A YAML file (`--config`), or an embedded default of one tenant whose token is
//! made at first start and kept hashed in the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::super::diag::{Diagnostic, Source};
use super::super::file::{Dur, Size};

/// Where `serve` listens when neither `--listen` nor the config says.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

/// The tenant of the embedded default configuration.
pub(crate) const DEFAULT_TENANT: &str = "default";

/// How long a finished job is kept when the config says nothing.
const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// The file (in the data directory) holding the default tenant's token hashes.
const TOKENS_FILE: &str = "tokens";

/// The most connections the server may be configured to hold open.
const MAX_CONNECTIONS: usize = 65_536;

/// The largest weight a tenant may have (the engine's).
const MAX_WEIGHT: u32 = crate::Group::MAX_WEIGHT;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    /// Relative to the config file.
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    threads: Option<Spanned<usize>>,
    /// How long a stop waits for running jobs before cancelling them.
    #[serde(default)]
    drain_timeout: Option<Dur>,
    /// How long an item post waits for room in a full slot before answering 429.
    #[serde(default)]
    post_timeout: Option<Dur>,
    /// Connections open at once, in all and from one address.
    #[serde(default)]
    max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    max_connections_per_address: Option<Spanned<usize>>,
    /// How long a client has to send a request's headers (and an idle connection lives).
    #[serde(default)]
    header_timeout: Option<Dur>,
    body_timeout: Option<Dur>,
    /// The least bytes per second a request body must average while the server waits for
    /// it (0: no least).
    #[serde(default)]
    min_body_rate: Option<Size>,
    /// How long a finished job (its status, summary and directory) is kept.
    #[serde(default)]
    job_retention: Option<Dur>,
    /// Most bytes of compiled components kept, in memory and in the on-disk cache.
    #[serde(default)]
    compiled_cache_bytes: Option<Size>,
    tenants: Vec<Spanned<TenantDef>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantDef {
    id: Spanned<String>,
    /// `sha256:HEX` of each token (`routilux serve token` makes one and prints both).
    tokens: Vec<Spanned<String>>,
    /// Its share of the worker pool against the other tenants with work (1 to 10,000).
    #[serde(default)]
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    quotas: QuotasDef,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasDef {
    plugins: Option<usize>,
    plugin_bytes: Option<Size>,
    flows: Option<usize>,
    jobs: Option<usize>,
    disk_bytes: Option<Size>,
    activations_per_second: Option<Spanned<u32>>,
    memory_bytes: Option<Spanned<Size>>,
    request_bytes: Option<Size>,
    instances: Option<Spanned<usize>>,
    queued_items: Option<Spanned<u64>>,
}

/// What a tenant may hold and run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quotas {
    /// Plugins stored.
    pub plugins: usize,
    /// Bytes of all its plugins' components together.
    pub plugin_bytes: u64,
    /// Flows stored.
    pub flows: usize,
    /// Jobs running at once.
    pub jobs: usize,
    /// Bytes of its data directory: plugins, flows, and its jobs' stores.
    pub disk_bytes: u64,
    /// Activations of all its jobs together per second (bursts of as many); past it an
    /// activation waits for its turn, its batch queued. `None`: no limit.
    pub activations_per_second: Option<u32>,
    /// Bytes all its running jobs hold together: their guests' linear memories (and each
    /// instance's overhead), queued items, WorkerState, held emits. Past it a slot is full
    /// (posts wait, then answer 429), a guest's memory cannot grow (it traps, retryable), a
    /// state write fails.
    pub memory_bytes: u64,
    /// Bytes of request bodies its requests hold in memory at once (uploads being read,
    /// items being parsed); a request finding none left waits up to the body timeout, then
    /// answers 503. Never less than its largest single body (see [`Quotas::request_room`]).
    pub request_bytes: u64,
    /// WebAssembly instances all its running jobs keep alive at once, busy or idle. A routine
    /// needing a new one past it has an idle one of the tenant dropped, or waits for one (up
    /// to its activation timeout, then fails retryable).
    pub instances: usize,
    /// Items all its running jobs hold queued at once (in slots, and emits held for them).
    /// Past it a slot is full: posts wait, then answer 429; an emit waits, then fails
    /// retryable. The count bound beside `memory_bytes`' byte bound: a flood of tiny items
    /// costs the host a slot entry each whatever their size.
    pub queued_items: u64,
}

impl Quotas {
    /// The `request_bytes` a tenant gets: what it was given, and at least its largest
    /// single body (a component up to its `plugin_bytes`, a 16 MiB request), so that any
    /// one request fits alone.
    pub fn request_room(&self) -> u64 {
        self.request_bytes
            .max(self.plugin_bytes.min(crate::wasm::MAX_COMPONENT_BYTES))
            .max(16 << 20)
    }
}

/// The smallest `queued_items` quota: each slot of a running job keeps some item credit
/// reserved, so fewer would refuse posts while the tenant's slots are nearly empty.
pub(crate) const MIN_QUEUED_ITEMS: u64 = 1_000;

/// The default `compiled_cache_bytes`.
pub(crate) const DEFAULT_COMPILED_CACHE_BYTES: u64 = 1 << 30;

/// The smallest `memory_bytes` quota: below it not even one instance of a small guest fits.
pub(crate) const MIN_MEMORY_QUOTA: u64 = 16 << 20;

impl Default for Quotas {
    fn default() -> Self {
        Self {
            plugins: 64,
            plugin_bytes: 256 << 20,
            flows: 128,
            jobs: 16,
            disk_bytes: 10 << 30,
            activations_per_second: None,
            memory_bytes: 4 << 30,
            request_bytes: 512 << 20,
            instances: 256,
            queued_items: 1_000_000,
        }
    }
}

/// One tenant of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TenantConfig {
    pub id: String,
    /// SHA-256 of each of its tokens.
    pub token_hashes: Vec<[u8; 32]>,
    /// Its share of the workers against the other tenants with work.
    pub weight: u32,
    pub quotas: Quotas,
}

/// The server's configuration, checked.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub threads: usize,
    pub drain_timeout: Duration,
    pub post_timeout: Duration,
    /// How long a finished job is kept (then its directory is removed).
    pub job_retention: Duration,
    /// Most bytes of compiled components kept, in memory (beyond those its plugins use) and
    /// in the on-disk cache, least recently used first out.
    pub compiled_cache_bytes: u64,
    pub connections: Connections,
    pub tenants: Vec<TenantConfig>,
}

/// What the server lets clients hold open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Connections {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max: usize,
    /// Connections open at once from one IP address.
    pub per_address: usize,
    /// How long a client has to send a request's headers, counted from the connection's
    /// start or the end of its previous response (so an idle keep-alive connection closes
    /// after it too).
    pub header_timeout: Duration,
    /// How long a request body may send nothing (between two pieces of it) before the
    /// request is answered 408 and the connection closed.
    pub body_timeout: Duration,
    /// The least bytes per second a request body must keep up over the time the server
    /// waits for it (not while it holds off reading: backpressure is not the client's
    /// doing), as a token bucket holding [`BODY_RATE_GRACE`] of credit (see the listener's
    /// `RateBody`); 0: no least. Below it the request is answered 408 and the connection
    /// closed, so a body trickling within `body_timeout` cannot hold a connection and a
    /// handler for hours.
    pub min_body_rate: u64,
}

/// The most `min_body_rate` may ask.
const MAX_MIN_BODY_RATE: u64 = 100 << 20;

/// How long a request body may wait on its client before [`Connections::min_body_rate`]
/// is held to it.
pub(crate) const BODY_RATE_GRACE: Duration = Duration::from_secs(5);

impl Default for Connections {
    fn default() -> Self {
        Self {
            max: 1_024,
            per_address: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            min_body_rate: 1 << 10,
        }
    }
}

/// Whether `s` is a name the server accepts for a tenant, plugin or flow: 1 to 64 ASCII
/// letters, digits, `_` and `-`, starting with a letter or digit (never a path).
pub(crate) fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_alphanumeric() || (i > 0 && (b == b'_' || b == b'-')))
}

/// The data directory when none is configured: `$XDG_DATA_HOME/routilux/serve` or
/// `~/.local/share/routilux/serve`.
pub(crate) fn default_data_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_DATA_HOME")
        .map(|d| d.join("routilux").join("serve"))
        .or_else(|| env("HOME").map(|d| d.join(".local/share/routilux/serve")))
}

/// A new API token: `rlx_` and 64 hex digits from the OS's CSPRNG.
pub(crate) fn new_token() -> Result<String, String> {
    Ok(format!("rlx_{}", random_hex(32)?))
}

/// `n` random bytes as hex.
pub(crate) fn random_hex(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(hex(&bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a token.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// `sha256:HEX` of a token, as a config file holds it.
pub(crate) fn token_hash_text(token: &str) -> String {
    format!("sha256:{}", hex(&token_hash(token)))
}

fn parse_hash(s: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "`{}` is not a token hash: write `sha256:` and 64 hex digits (`routilux serve \
             token` prints one)",
            crate::term::escape(s)
        )
    };
    let h = s.strip_prefix("sha256:").ok_or_else(bad)?;
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The configuration: from `file`, or the embedded default; `listen` and `data_dir` (from the
/// command line) override the file's.
pub(crate) fn load(
    file: Option<&Path>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) -> Result<(Config, Option<String>), Vec<Diagnostic>> {
    let threads_default = std::thread::available_parallelism().map_or(2, |n| n.get());
    let Some(path) = file else {
        let data_dir = data_dir.or_else(default_data_dir).ok_or_else(|| {
            vec![Diagnostic::error(
                "no data directory: give --data-dir DIR (there is no $HOME or $XDG_DATA_HOME)",
            )]
        })?;
        let (hashes, new) = default_tokens(&data_dir).map_err(|e| vec![Diagnostic::error(e)])?;
        let config = Config {
            listen: listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid address")),
            data_dir,
            threads: threads_default,
            drain_timeout: Duration::from_secs(30),
            post_timeout: Duration::from_secs(5),
            job_retention: DEFAULT_JOB_RETENTION,
            compiled_cache_bytes: DEFAULT_COMPILED_CACHE_BYTES,
            connections: Connections::default(),
            tenants: vec![TenantConfig {
                id: DEFAULT_TENANT.to_owned(),
                token_hashes: hashes,
                weight: 1,
                quotas: Quotas::default(),
            }],
        };
        return Ok((config, new));
    };
    let src = Source::read(path).map_err(|d| vec![d])?;
    let f: ConfigFile = src.parse().map_err(|d| vec![d])?;
    let mut diags = Vec::new();
    let listen = match (listen, &f.listen) {
        (Some(l), _) => Some(l),
        (None, None) => Some(DEFAULT_LISTEN.parse().expect("a valid address")),
        (None, Some(l)) => match l.value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                diags.push(src.error(
                    &l.referenced,
                    format!("`listen: {}` is not an address and port ({e})", l.value),
                ));
                None
            }
        },
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let data_dir = data_dir
        .or_else(|| f.data_dir.as_ref().map(|d| base.join(d)))
        .or_else(default_data_dir);
    let threads = match &f.threads {
        None => threads_default,
        Some(t) if (1..=super::super::MAX_THREADS).contains(&t.value) => t.value,
        Some(t) => {
            diags.push(src.error(
                &t.referenced,
                format!(
                    "threads must be 1 to {}, not {}",
                    super::super::MAX_THREADS,
                    t.value
                ),
            ));
            1
        }
    };
    let mut tenants: Vec<TenantConfig> = Vec::new();
    let mut seen_hashes = std::collections::HashMap::new();
    for t in &f.tenants {
        let def = &t.value;
        if !valid_name(&def.id.value) || def.id.value.bytes().any(|b| b.is_ascii_uppercase()) {
            diags.push(src.error(
                &def.id.referenced,
                "a tenant id is 1 to 64 lowercase letters, digits, `_` and `-`, starting with a \
                 letter or digit (it names a directory, also on filesystems that ignore case)",
            ));
        }
        if tenants.iter().any(|o| o.id == def.id.value) {
            diags.push(src.error(
                &def.id.referenced,
                format!("tenant `{}` is configured twice", def.id.value),
            ));
        }
        let mut hashes = Vec::new();
        for tok in &def.tokens {
            match parse_hash(&tok.value) {
                Ok(h) => {
                    if let Some(other) = seen_hashes.insert(h, def.id.value.clone()) {
                        diags.push(src.error(
                            &tok.referenced,
                            format!(
                                "this token is also tenant `{other}`'s: a token names one tenant"
                            ),
                        ));
                    }
                    hashes.push(h);
                }
                Err(e) => diags.push(src.error(&tok.referenced, e)),
            }
        }
        if def.tokens.is_empty() {
            diags.push(src.error(
                &def.id.referenced,
                format!(
                    "tenant `{}` has no tokens: nobody could use it",
                    def.id.value
                ),
            ));
        }
        let weight = match &def.weight {
            None => 1,
            Some(w) if (1..=MAX_WEIGHT).contains(&w.value) => w.value,
            Some(w) => {
                diags.push(src.error(
                    &w.referenced,
                    format!(
                        "weight {} of tenant `{}` is out of range: a weight is 1 to {MAX_WEIGHT}",
                        w.value, def.id.value
                    ),
                ));
                1
            }
        };
        let mut quotas = Quotas::default();
        let q = &def.quotas;
        if let Some(n) = q.plugins {
            quotas.plugins = n;
        }
        if let Some(n) = q.plugin_bytes {
            quotas.plugin_bytes = n.0;
        }
        if let Some(n) = q.flows {
            quotas.flows = n;
        }
        if let Some(n) = q.jobs {
            quotas.jobs = n;
        }
        if let Some(n) = q.disk_bytes {
            quotas.disk_bytes = n.0;
        }
        if let Some(n) = &q.activations_per_second {
            if n.value == 0 {
                diags.push(src.error(
                    &n.referenced,
                    "`activations_per_second: 0` would stop the tenant: leave it out for no \
                     limit",
                ));
            } else {
                quotas.activations_per_second = Some(n.value);
            }
        }
        if let Some(n) = q.request_bytes {
            quotas.request_bytes = n.0;
        }
        if let Some(n) = &q.memory_bytes {
            if n.value.0 < MIN_MEMORY_QUOTA {
                diags.push(src.error(
                    &n.referenced,
                    format!(
                        "`memory_bytes: {}` is too small to run a job: the least is {}",
                        crate::model::budget::bytes(n.value.0),
                        crate::model::budget::bytes(MIN_MEMORY_QUOTA)
                    ),
                ));
            } else {
                quotas.memory_bytes = n.value.0;
            }
        }
        if let Some(n) = &q.instances {
            if n.value == 0 {
                diags.push(src.error(
                    &n.referenced,
                    "`instances: 0` would let none of the tenant's routines run: the least is 1",
                ));
            } else {
                quotas.instances = n.value;
            }
        }
        if let Some(n) = &q.queued_items {
            if n.value < MIN_QUEUED_ITEMS {
                diags.push(src.error(
                    &n.referenced,
                    format!(
                        "`queued_items: {}` is too few for a job's slots to take a batch: the \
                         least is {MIN_QUEUED_ITEMS}",
                        n.value
                    ),
                ));
            } else {
                quotas.queued_items = n.value;
            }
        }
        tenants.push(TenantConfig {
            id: def.id.value.clone(),
            token_hashes: hashes,
            weight,
            quotas,
        });
    }
    if f.tenants.is_empty() {
        diags.push(Diagnostic::error(format!(
            "{}: `tenants` is empty: nobody could use the server",
            path.display()
        )));
    }
    let mut connections = Connections::default();
    let mut count = |v: &Option<Spanned<usize>>, what: &str, max: usize, out: &mut usize| {
        if let Some(n) = v {
            if (1..=max).contains(&n.value) {
                *out = n.value;
            } else {
                diags.push(src.error(
                    &n.referenced,
                    format!("`{what}: {}` is out of range: 1 to {max}", n.value),
                ));
            }
        }
    };
    count(
        &f.max_connections,
        "max_connections",
        MAX_CONNECTIONS,
        &mut connections.max,
    );
    count(
        &f.max_connections_per_address,
        "max_connections_per_address",
        MAX_CONNECTIONS,
        &mut connections.per_address,
    );
    connections.per_address = connections.per_address.min(connections.max);
    for (name, given, set) in [
        (
            "header_timeout",
            &f.header_timeout,
            &mut connections.header_timeout,
        ),
        (
            "body_timeout",
            &f.body_timeout,
            &mut connections.body_timeout,
        ),
    ] {
        if let Some(d) = given {
            if d.0.is_zero() || d.0 > Duration::from_secs(3_600) {
                diags.push(Diagnostic::error(format!(
                    "{}: `{name}` is out of range: more than 0 and at most 1h",
                    path.display()
                )));
            } else {
                *set = d.0;
            }
        }
    }
    if let Some(r) = f.min_body_rate {
        // Past this no network a client is on could keep up: every body would be cut.
        if r.0 > MAX_MIN_BODY_RATE {
            diags.push(Diagnostic::error(format!(
                "{}: `min_body_rate` is out of range: at most {}/s (0: no least)",
                path.display(),
                crate::model::budget::bytes(MAX_MIN_BODY_RATE)
            )));
        } else {
            connections.min_body_rate = r.0;
        }
    }
    let Some(data_dir) = data_dir else {
        diags.push(Diagnostic::error(
            "no data directory: set `data_dir:` or give --data-dir DIR",
        ));
        return Err(diags);
    };
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok((
        Config {
            listen: listen.expect("checked above"),
            data_dir,
            threads,
            drain_timeout: f.drain_timeout.map_or(Duration::from_secs(30), |d| d.0),
            post_timeout: f.post_timeout.map_or(Duration::from_secs(5), |d| d.0),
            job_retention: f.job_retention.map_or(DEFAULT_JOB_RETENTION, |d| d.0),
            compiled_cache_bytes: f
                .compiled_cache_bytes
                .map_or(DEFAULT_COMPILED_CACHE_BYTES, |n| n.0),
            connections,
            tenants,
        },
        None,
    ))
}

/// The default tenant's token hashes, kept in `DATA/tokens`; at first start a token is made,
/// its hash stored, and the token returned (to be printed once).
fn default_tokens(data_dir: &Path) -> Result<(Vec<[u8; 32]>, Option<String>), String> {
    let path = data_dir.join(TOKENS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let hashes: Result<Vec<_>, _> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| parse_hash(l.trim()))
                .collect();
            let hashes = hashes.map_err(|e| format!("{}: {e}", path.display()))?;
            if hashes.is_empty() {
                return Err(format!(
                    "{} holds no token hash: run `routilux serve token` to make one",
                    path.display()
                ));
            }
            Ok((hashes, None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = rotate_token(data_dir)?;
            Ok((vec![token_hash(&token)], Some(token)))
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Makes a new token for the default tenant, replacing the stored ones (the old tokens stop
/// working at the next start); returns it.
pub(crate) fn rotate_token(data_dir: &Path) -> Result<String, String> {
    let token = new_token()?;
    super::disk::private_dir(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    super::disk::write_atomic(
        &data_dir.join(TOKENS_FILE),
        format!("{}\n", token_hash_text(&token)).as_bytes(),
    )
    .map_err(|e| format!("cannot write {}: {e}", data_dir.join(TOKENS_FILE).display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_never_paths() {
        for ok in ["news", "a", "news-js", "n_2", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "-a",
            "_a",
            "a.wasm",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_token_hash_reads_back() {
        let t = new_token().unwrap();
        assert_eq!(parse_hash(&token_hash_text(&t)).unwrap(), token_hash(&t));
        assert!(parse_hash("sha256:zz").is_err());
        assert!(parse_hash(&hex(&token_hash(&t))).is_err());
    }

    #[test]
    fn the_least_body_rate_is_read_and_bounded() {
        let dir = std::env::temp_dir().join(format!("rlx-cfg-{}", random_hex(8).unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let hash = token_hash_text(&new_token().unwrap());
        let file = dir.join("serve.yaml");
        let load_with = |rate: &str| {
            std::fs::write(
                &file,
                format!("data_dir: data\n{rate}tenants:\n  - id: a\n    tokens: [\"{hash}\"]\n"),
            )
            .unwrap();
            load(Some(&file), None, None)
        };
        let rate = |c: Config| c.connections.min_body_rate;
        assert_eq!(rate(load_with("").unwrap().0), 1 << 10);
        assert_eq!(rate(load_with("min_body_rate: 0\n").unwrap().0), 0);
        assert_eq!(
            rate(load_with("min_body_rate: 64KiB\n").unwrap().0),
            64 << 10
        );
        let d = load_with("min_body_rate: 1TiB\n").unwrap_err();
        assert!(
            d[0].message
                .contains("`min_body_rate` is out of range: at most 100.0 MiB/s"),
            "{}",
            d[0].message
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn weights_are_read_and_bounded() {
        let dir = std::env::temp_dir().join(format!("rlx-cfg-{}", random_hex(8).unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ha, hb) = (
            token_hash_text(&new_token().unwrap()),
            token_hash_text(&new_token().unwrap()),
        );
        let file = dir.join("serve.yaml");
        let write = |weights: &str| {
            std::fs::write(
                &file,
                format!(
                    "data_dir: data\ntenants:\n  - id: a\n    tokens: [\"{ha}\"]\n{weights}  - id: b\n    tokens: [\"{hb}\"]\n"
                ),
            )
            .unwrap();
        };
        write("    weight: 3\n");
        let (c, _) = load(Some(&file), None, None).unwrap();
        let w: Vec<u32> = c.tenants.iter().map(|t| t.weight).collect();
        assert_eq!(w, [3, 1]);
        for bad in ["0", "10001"] {
            write(&format!("    weight: {bad}\n"));
            let d = load(Some(&file), None, None).unwrap_err();
            assert_eq!(d.len(), 1, "{d:?}");
            assert!(d[0].message.contains("out of range"), "{}", d[0].message);
            assert_eq!(d[0].place.as_ref().map(|p| p.line), Some(5), "{d:?}");
        }
        write("    quotas: {memory_bytes: 1GiB}\n");
        let (c, _) = load(Some(&file), None, None).unwrap();
        let m: Vec<u64> = c.tenants.iter().map(|t| t.quotas.memory_bytes).collect();
        assert_eq!(m, [1 << 30, Quotas::default().memory_bytes]);
        write("    quotas:\n      memory_bytes: 1MiB\n");
        let d = load(Some(&file), None, None).unwrap_err();
        assert!(
            d[0].message
                .contains("`memory_bytes: 1.0 MiB` is too small"),
            "{}",
            d[0].message
        );
        assert_eq!(d[0].place.as_ref().map(|p| p.line), Some(6), "{d:?}");
        write("    quotas: {instances: 3}\n");
        let (c, _) = load(Some(&file), None, None).unwrap();
        let n: Vec<usize> = c.tenants.iter().map(|t| t.quotas.instances).collect();
        assert_eq!(n, [3, Quotas::default().instances]);
        write("    quotas:\n      instances: 0\n");
        let d = load(Some(&file), None, None).unwrap_err();
        assert!(d[0].message.contains("`instances: 0`"), "{}", d[0].message);
        assert_eq!(d[0].place.as_ref().map(|p| p.line), Some(6), "{d:?}");
        write("    quotas: {queued_items: 5000}\n");
        let (c, _) = load(Some(&file), None, None).unwrap();
        let n: Vec<u64> = c.tenants.iter().map(|t| t.quotas.queued_items).collect();
        assert_eq!(n, [5000, Quotas::default().queued_items]);
        write("    quotas:\n      queued_items: 10\n");
        let d = load(Some(&file), None, None).unwrap_err();
        assert!(
            d[0].message.contains("`queued_items: 10` is too few"),
            "{}",
            d[0].message
        );
        assert_eq!(d[0].place.as_ref().map(|p| p.line), Some(6), "{d:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
