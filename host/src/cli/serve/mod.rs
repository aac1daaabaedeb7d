//! `routilux serve`: one long-running host for many tenants' flows behind an HTTP API. One
//! WebAssembly engine, one compiled-component cache and one worker pool serve every tenant;
//! the HTTP side runs on its own two tokio threads.

mod api;
pub(crate) mod config;
mod disk;
mod events;
mod host;
mod listen;

use std::net::SocketAddr;
use std::path::PathBuf;

use super::Code;

/// What `routilux serve` was given.
pub(crate) struct ServeArgs {
    pub config: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

/// Runs the server until SIGTERM or SIGINT, then stops taking work: jobs whose input is
/// closed get the drain timeout to finish; the rest are stopped (their running activations
/// end) and stay in their stores, to resume at the next start.
pub(crate) fn serve(args: ServeArgs) -> Code {
    let (config, new_token) =
        match config::load(args.config.as_deref(), args.listen, args.data_dir.clone()) {
            Ok(c) => c,
            Err(diags) => {
                super::print_diagnostics(&diags);
                return Code::Invalid;
            }
        };
    let drain = config.drain_timeout;
    let listen = config.listen;
    let data_dir = config.data_dir.clone();
    let host = match host::Host::start(config) {
        Ok(h) => h,
        Err(e) => {
            errln!("error: {e}");
            return Code::Failed;
        }
    };
    if let Some(token) = new_token {
        errln!(
            "a new API token for tenant `{}` (shown once; its hash is kept in {}):\n  {token}",
            config::DEFAULT_TENANT,
            data_dir.join("tokens").display()
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("routilux-http")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the HTTP threads: {e}");
            return Code::Failed;
        }
    };
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        errln!(
            "routilux serve: listening on http://{bound} (data in {})",
            data_dir.display()
        );
        let app = api::router(host.clone());
        let limits = host.config.connections;
        tokio::spawn(reload_on_sighup(
            host.clone(),
            args.config.clone(),
            args.listen,
            args.data_dir.clone(),
        ));
        listen::serve(listener, app, limits, stop_signal(), || host.end_streams()).await;
        Ok::<(), String>(())
    });
    // The listener is closed: no request is taken any more.
    let (drained, kept) = host.shutdown(drain);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    errln!(
        "routilux serve: stopped ({drained} jobs finished while draining, {kept} kept in their \
         stores to resume at the next start)"
    );
    match served {
        Ok(()) => Code::Ok,
        Err(e) => {
            errln!("error: {e}");
            Code::Failed
        }
    }
}

/// Reloads the configuration at each SIGHUP (the same file and command-line overrides as
/// at the start; with no file, the default tenant's tokens in `DATA/tokens`). A file that no
/// longer holds is reported, every problem located, and the running configuration kept.
async fn reload_on_sighup(
    host: std::sync::Arc<host::Host>,
    file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot catch SIGHUP (no config reload): {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let (host, file, data_dir) = (host.clone(), file.clone(), data_dir.clone());
        let done = tokio::task::spawn_blocking(move || {
            // Without a file the default tenant's tokens are re-read from where they are
            // kept, which the start also used.
            let dir = match &file {
                None => data_dir.or_else(|| Some(host.config.data_dir.clone())),
                Some(_) => data_dir,
            };
            match config::load(file.as_deref(), listen, dir) {
                Ok((c, token)) => {
                    if let Some(t) = token {
                        errln!(
                            "a new API token for tenant `{}` (shown once):\n  {t}",
                            config::DEFAULT_TENANT
                        );
                    }
                    let said = host.reload(&c);
                    for line in &said {
                        errln!("routilux serve: reload: {line}");
                    }
                    errln!(
                        "routilux serve: configuration reloaded ({} changes)",
                        said.len()
                    );
                }
                Err(diags) => {
                    super::print_diagnostics(&diags);
                    errln!("routilux serve: configuration not reloaded: the running one is kept");
                }
            }
        })
        .await;
        if let Err(e) = done {
            errln!("routilux serve: the reload failed: {e}");
        }
    }
}

/// Resolves at the first SIGINT or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot catch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    errln!("routilux serve: stopping (no new requests; draining running jobs)");
}

/// `routilux serve token`: a new token for the default tenant (its hash replaces the stored
/// ones), or, with `hash_only`, a token and the hash to put in a config file (nothing stored).
/// `routilux serve purge TENANT`: removes a tenant's directory (see [`disk::purge`]).
pub(crate) fn purge(
    tenant: &str,
    config_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    yes: bool,
) -> Code {
    let esc = |s: &str| crate::term::escape(s).into_owned();
    if !config::valid_name(tenant) {
        errln!(
            "error: `{}` is not a tenant id (1 to 64 letters, digits, `_` and `-`)",
            esc(tenant)
        );
        return Code::Invalid;
    }
    let data_dir = match &config_file {
        Some(file) => match config::load(Some(file), None, data_dir) {
            Ok((c, _)) => {
                if c.tenants.iter().any(|t| t.id == tenant) {
                    errln!(
                        "error: tenant `{tenant}` is in {}: remove it there (and reload the \
                         server with SIGHUP) before purging it",
                        file.display()
                    );
                    return Code::Invalid;
                }
                c.data_dir
            }
            Err(diags) => {
                super::print_diagnostics(&diags);
                return Code::Invalid;
            }
        },
        None => match data_dir.or_else(config::default_data_dir) {
            Some(d) => d,
            None => {
                errln!("error: no data directory: give --config FILE or --data-dir DIR");
                return Code::Invalid;
            }
        },
    };
    match disk::purge(&data_dir, tenant, !yes) {
        Ok(p) => {
            let what = format!(
                "{} plugins, {} flows, {} jobs, {} in {}",
                p.plugins,
                p.flows,
                p.jobs,
                crate::model::budget::bytes(p.bytes),
                p.dir.display()
            );
            if yes {
                outln!("purged tenant `{tenant}`: {what}");
                Code::Ok
            } else {
                outln!("tenant `{tenant}` holds {what}; run again with --yes to remove it");
                Code::Failed
            }
        }
        Err(e) => {
            errln!("error: {e}");
            Code::Failed
        }
    }
}

pub(crate) fn token(data_dir: Option<PathBuf>, hash_only: bool) -> Code {
    if hash_only {
        return match config::new_token() {
            Ok(t) => {
                outln!("token: {t}");
                outln!("hash:  {}", config::token_hash_text(&t));
                Code::Ok
            }
            Err(e) => {
                errln!("error: {e}");
                Code::Failed
            }
        };
    }
    let Some(dir) = data_dir.or_else(config::default_data_dir) else {
        errln!("error: no data directory: give --data-dir DIR");
        return Code::Usage;
    };
    match config::rotate_token(&dir) {
        Ok(t) => {
            outln!("{t}");
            errln!(
                "a new token for tenant `{}`; the old ones stop working when the server reloads \
                 (SIGHUP) or next starts",
                config::DEFAULT_TENANT
            );
            Code::Ok
        }
        Err(e) => {
            errln!("error: {e}");
            Code::Failed
        }
    }
}
