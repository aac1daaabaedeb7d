//! What `serve` keeps on disk per tenant: its plugins' components and its flow files, each in a
//! file named by the SHA-256 of its content (names from URLs never become paths), and an index
//! from names to hashes, replaced atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The bytes of every file under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// What a purge removed (or would remove) of a tenant's directory.
#[derive(Debug)]
pub(crate) struct Purged {
    pub dir: PathBuf,
    pub plugins: usize,
    pub flows: usize,
    pub jobs: usize,
    pub bytes: u64,
}

/// Removes tenant `id`'s directory under `data_dir` (all its plugins, flows, jobs and their
/// stores), or with `dry_run` only says what it holds. Refused while a server has the tenant
/// live (its lock is held). The directory is first renamed aside, under the lock, so a
/// server that opens the tenant meanwhile starts on a new, empty one.
pub(crate) fn purge(data_dir: &Path, id: &str, dry_run: bool) -> Result<Purged, String> {
    let tenants = data_dir.join("tenants");
    let dir = tenants.join(id);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) if m.file_type().is_symlink() => {
            return Err(format!(
                "{} is a symbolic link, not a tenant's directory: remove it by hand",
                dir.display()
            ));
        }
        _ => {
            return Err(format!(
                "there is no tenant `{id}` in {}",
                data_dir.display()
            ));
        }
    }
    // What an interrupted purge of this tenant left aside.
    if let Ok(entries) = std::fs::read_dir(&tenants) {
        let prefix = format!(".purging-{id}-");
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix(&prefix)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
            if ours && !dry_run {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    // A dry run writes nothing: without a lock file no server ever opened the tenant.
    let lock = if dry_run && !dir.join(LOCK).exists() {
        None
    } else {
        lock_dir(&dir)
            .map_err(|e| format!("cannot lock {}: {e}", dir.display()))?
            .ok_or_else(|| {
                format!(
                    "tenant `{id}` is live in a running server: remove it from the server's \
                 configuration and reload it (SIGHUP) first"
                )
            })
            .map(Some)?
    };
    let index = TenantDir {
        dir: dir.clone(),
        lock: parking_lot::Mutex::new(None),
    }
    .index()
    .unwrap_or_default();
    let jobs = std::fs::read_dir(dir.join("jobs")).map_or(0, |d| d.flatten().count());
    let purged = Purged {
        plugins: index.plugins.len(),
        flows: index.flows.len(),
        jobs,
        bytes: tree_bytes(&dir),
        dir: dir.clone(),
    };
    if dry_run {
        return Ok(purged);
    }
    let aside = data_dir
        .join("tenants")
        .join(format!(".purging-{id}-{}", std::process::id()));
    std::fs::rename(&dir, &aside)
        .map_err(|e| format!("cannot move {} aside: {e}", dir.display()))?;
    drop(lock);
    std::fs::remove_dir_all(&aside).map_err(|e| {
        format!(
            "tenant `{id}` is gone from the server, but removing {} failed: {e} (remove \
             it by hand)",
            aside.display()
        )
    })?;
    if let Ok(d) = std::fs::File::open(data_dir.join("tenants")) {
        let _ = d.sync_all();
    }
    Ok(purged)
}

/// Writes `bytes` to `path` through a temporary file, synced and renamed into place, then syncs
/// the directory: a crash leaves the old file or the new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and its parents) readable by this user only, and makes an existing one so:
/// it holds every tenant's plugins, flows and items.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A tenant's index: plugin names and flow ids to the hashes of their content.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Index {
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
    #[serde(default)]
    pub flows: BTreeMap<String, String>,
}

/// One tenant's directory: `DATA/tenants/ID/` with `index.json` and `blobs/HASH`, and
/// `.lock`, locked (an advisory `flock`) while a server has the tenant live, so that neither a
/// second server on the same data directory nor `routilux serve purge` can touch it.
#[derive(Debug)]
pub(crate) struct TenantDir {
    dir: PathBuf,
    lock: parking_lot::Mutex<Option<std::fs::File>>,
}

/// The lock file in a tenant's directory.
const LOCK: &str = ".lock";

/// Locks the tenant directory `dir` for this process; `Ok(None)` if another process holds it.
fn lock_dir(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

impl TenantDir {
    /// Opens (creating it if needed) the directory of tenant `id` (a checked name) and locks
    /// it; an error if another process (a server, a purge) holds it.
    pub fn open(data_dir: &Path, id: &str) -> std::io::Result<Self> {
        private_dir(data_dir)?;
        let dir = data_dir.join("tenants").join(id);
        std::fs::create_dir_all(dir.join("blobs"))?;
        let Some(lock) = lock_dir(&dir)? else {
            return Err(std::io::Error::other(
                "another process holds it (a server on the same data directory, or `routilux \
                 serve purge`)",
            ));
        };
        Ok(Self {
            dir,
            lock: parking_lot::Mutex::new(Some(lock)),
        })
    }

    /// Lets the directory go (the tenant was removed from the configuration): a purge may
    /// now remove it.
    pub fn unlock(&self) {
        self.lock.lock().take();
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// The index (empty for a new tenant).
    pub fn index(&self) -> Result<Index, String> {
        let path = self.dir.join("index.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is damaged: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Replaces the index, then removes the blobs neither it nor `keep` (what unfinished
    /// jobs run) names.
    pub fn save_index(
        &self,
        index: &Index,
        keep: &std::collections::BTreeSet<String>,
    ) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(index).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join("index.json"), &bytes)?;
        let named: std::collections::BTreeSet<&String> = index
            .plugins
            .values()
            .chain(index.flows.values())
            .chain(keep)
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !named.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// The bytes of every file under the tenant's directory.
    pub fn usage(&self) -> u64 {
        tree_bytes(&self.dir)
    }

    /// Where the tenant's jobs are, one directory each.
    pub fn jobs_dir(&self) -> PathBuf {
        self.dir.join("jobs")
    }

    /// Stores a blob under its hash (once).
    pub fn put_blob(&self, hash: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join("blobs").join(hash);
        if path.is_file() {
            return Ok(());
        }
        write_atomic(&path, bytes)
    }

    /// The blob of `hash`.
    pub fn blob(&self, hash: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.join("blobs").join(hash))
    }
}

/// What a job runs and whether its input is closed: `JOB/job.json`, beside its store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobMeta {
    pub flow: String,
    /// The flow file's blob.
    pub flow_sha256: String,
    /// Each plugin the flow uses, by name, and its blob.
    pub plugins: BTreeMap<String, String>,
    pub created_ms: u64,
    pub closed: bool,
    /// When the flow's `execution.timeout` cancels it (milliseconds since the epoch).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

impl JobMeta {
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join("job.json");
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&dir.join("job.json"), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dry run writes nothing: a directory no server ever opened gets no lock file.
    #[test]
    fn a_dry_run_purge_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path();
        let dir = data.join("tenants").join("t");
        std::fs::create_dir_all(dir.join("jobs").join("j1")).unwrap();
        let p = purge(data, "t", true).unwrap();
        assert_eq!((p.plugins, p.flows, p.jobs), (0, 0, 1));
        assert!(!dir.join(LOCK).exists(), "a dry run made the lock file");
        assert!(dir.exists());
        purge(data, "t", false).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn the_index_and_its_blobs_survive_a_reopen_and_unnamed_blobs_go() {
        let d = tempfile::tempdir().unwrap();
        let t = TenantDir::open(d.path(), "acme").unwrap();
        assert!(t.index().unwrap().plugins.is_empty());
        t.put_blob("aa", b"one").unwrap();
        t.put_blob("bb", b"two").unwrap();
        let mut i = Index::default();
        i.plugins.insert("p".into(), "aa".into());
        t.save_index(&i, &Default::default()).unwrap();
        assert!(
            TenantDir::open(d.path(), "acme").is_err(),
            "locked while open"
        );
        drop(t);
        let t = TenantDir::open(d.path(), "acme").unwrap();
        assert_eq!(t.index().unwrap().plugins["p"], "aa");
        assert_eq!(t.blob("aa").unwrap(), b"one");
        assert!(t.blob("bb").is_err(), "a blob no index names is removed");
    }
}
