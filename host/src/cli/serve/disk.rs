//! What `serve` keeps on disk per tenant: its plugins' components and its flow files, each in a
//! file named by the SHA-256 of its content (names from URLs never become paths), and an index
//! from names to hashes, replaced atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// One tenant's directory: `DATA/tenants/ID/` with `index.json` and `blobs/HASH`.
#[derive(Clone, Debug)]
pub(crate) struct TenantDir {
    dir: PathBuf,
}

impl TenantDir {
    /// Opens (creating it if needed) the directory of tenant `id` (a checked name).
    pub fn open(data_dir: &Path, id: &str) -> std::io::Result<Self> {
        private_dir(data_dir)?;
        let dir = data_dir.join("tenants").join(id);
        std::fs::create_dir_all(dir.join("blobs"))?;
        Ok(Self { dir })
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
        fn walk(dir: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
                    _ => 0,
                })
                .sum()
        }
        walk(&self.dir)
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
        let t = TenantDir::open(d.path(), "acme").unwrap();
        assert_eq!(t.index().unwrap().plugins["p"], "aa");
        assert_eq!(t.blob("aa").unwrap(), b"one");
        assert!(t.blob("bb").is_err(), "a blob no index names is removed");
    }
}
