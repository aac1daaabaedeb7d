//! The on-disk cache of compiled components.
//!
//! Key: SHA-256 of the component's bytes, plus wasmtime's compatibility hash of the engine
//! (its version and every setting that affects code generation). A file is written to a
//! temporary name and renamed into place, so a reader never sees half a file; a file that
//! fails to load is reported, removed and recompiled.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled components go when no directory is configured: `$ROUTILUX_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/routilux`, else `$HOME/.cache/routilux`; `None` (no cache) when none
/// of these is set — never a shared directory such as `/tmp`, where another user could plant
/// an entry.
pub(crate) fn default_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("ROUTILUX_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("routilux")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("routilux")))
}

/// Creates the cache directory (private to the user) and checks that nobody else can write
/// in it; a directory that fails the check is not used (compiles are then not cached).
pub(crate) fn prepare(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o022 == 0 => true,
        Ok(_) => {
            tracing::warn!(
                dir = %dir.display(),
                "cache directory is writable by others; not caching compiled components"
            );
            false
        }
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot create the cache directory; not caching compiled components"
            );
            false
        }
    }
}

/// The cache file for `bytes` compiled by `engine`.
pub(crate) fn entry(dir: &Path, engine: &Engine, bytes: &[u8]) -> PathBuf {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let digest = Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}-{:016x}.cwasm", h.finish()))
}

/// Loads a compiled component from the cache, if a usable entry is there.
pub(crate) fn load(engine: &Engine, path: &Path) -> Option<Component> {
    // Read into memory rather than map the file: a mapping would turn another process
    // truncating or rewriting the entry into a SIGBUS here.
    let bytes = std::fs::read(path).ok()?;
    // SAFETY: `deserialize` trusts its input to be wasmtime's own output. The bytes come from
    // routilux's cache directory, were written by `store` below from `Component::serialize`,
    // and the entry's name carries the engine's compatibility hash; wasmtime still checks the
    // header, version and engine settings and refuses a mismatch. What it cannot defend
    // against is someone with write access to the cache directory planting a crafted file:
    // keep the cache directory private to the user running the host.
    #[allow(unsafe_code)]
    let loaded = unsafe { Component::deserialize(engine, &bytes) };
    match loaded {
        Ok(c) => {
            // Used now: the last to go when the cache is pruned.
            if let Ok(f) = std::fs::File::options().write(true).open(path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            Some(c)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unusable cache entry; recompiling");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// Writes a compiled component to the cache (best effort: a failure only costs a recompile),
/// then prunes the cache to `max_bytes`.
pub(crate) fn store(component: &Component, path: &Path, max_bytes: u64) {
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let bytes = component
            .serialize()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "could not write the compiled-component cache");
    }
    if let Some(dir) = path.parent() {
        prune(dir, max_bytes, path);
    }
}

/// Removes the entries of the cache in `dir` used least recently (by their modification
/// time, which a load refreshes) until the rest take at most `max_bytes`; never `keep` (the
/// entry just written).
pub(crate) fn prune(dir: &Path, max_bytes: u64, keep: &Path) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = read
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    if total <= max_bytes {
        return;
    }
    entries.sort();
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
            tracing::debug!(path = %path.display(), "pruned from the compiled-component cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_removes_the_least_recently_used_entries_down_to_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let p = d.path().join(format!("{name}.cwasm"));
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        std::fs::write(d.path().join("other.txt"), vec![0u8; 5000]).unwrap();
        // `a` is the oldest, but it is the one being kept.
        prune(d.path(), 2500, &d.path().join("a.cwasm"));
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.cwasm", "d.cwasm", "other.txt"]);
    }
}
