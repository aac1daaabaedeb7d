//! Grants belong to the operator.
//!
//! A plugin's manifest (`NAME.yaml` beside `NAME.wasm`) ships with the plugin, so it is the
//! plugin author's word: it may *request* read-only directories and environment variables,
//! and limits above the defaults. Only the operator grants: the flow file's `permissions:`
//! and `limits:`, or `--grant-requests` on the command line, which accepts the manifests'
//! requests. Whoever asks, some directories are never granted: `/`, `/proc`, `/sys`, `/dev`
//! (and anything under them), and routilux's own cache and tools directories (or a directory
//! holding them). Paths are compared after resolving symlinks, and a manifest may only request
//! directories inside its own plugin directory.

use std::path::{Path, PathBuf};

use crate::wasm::Permissions;

/// Directories never granted, with what they are (for the message).
const SYSTEM: [(&str, &str); 3] = [
    (
        "/proc",
        "the kernel's view of processes (a guest could read host memory)",
    ),
    ("/sys", "the kernel's devices and settings"),
    ("/dev", "device files"),
];

/// routilux's own directories, which no guest may read (compiled code, tools, data).
#[derive(Clone, Debug, Default)]
pub(crate) struct Protected {
    dirs: Vec<(PathBuf, &'static str)>,
}

impl Protected {
    /// The cache and tools directories of this process (those that exist).
    pub(crate) fn of_this_host(cache: Option<&Path>) -> Self {
        let mut p = Protected::default();
        if let Some(c) = cache {
            p.add(c, "routilux's compiled-component cache");
        }
        if let Ok(t) = super::guests::tools::dir() {
            p.add(&t, "routilux's guest toolchains");
        }
        p
    }

    fn add(&mut self, dir: &Path, what: &'static str) {
        if let Ok(c) = dir.canonicalize() {
            self.dirs.push((c, what));
        }
    }
}

/// Checks a directory grant: `host` (already joined to its base) must be an existing
/// directory, none of the never-granted ones, and, when `within` is given, inside it. Returns
/// the resolved path that is mounted.
pub(crate) fn check_dir(
    host: &Path,
    protected: &Protected,
    within: Option<&Path>,
) -> Result<PathBuf, String> {
    let real = host.canonicalize().map_err(|e| {
        format!(
            "read-only directory {} cannot be granted: {e}",
            host.display()
        )
    })?;
    if !real.is_dir() {
        return Err(format!(
            "read-only directory {} is not a directory",
            host.display()
        ));
    }
    let shown = if real == host {
        host.display().to_string()
    } else {
        format!("{} (resolved to {})", host.display(), real.display())
    };
    if real.parent().is_none() {
        return Err(format!(
            "{shown} is the root directory: it is never granted (grant the directory the \
             routine needs)"
        ));
    }
    for (dir, what) in SYSTEM {
        if real.starts_with(dir) {
            return Err(format!(
                "{shown} is under {dir}, {what}: it is never granted"
            ));
        }
    }
    for (dir, what) in &protected.dirs {
        if real.starts_with(dir) || dir.starts_with(&real) {
            return Err(format!(
                "{shown} {} {what} ({}): it is never granted",
                if real.starts_with(dir) {
                    "is inside"
                } else {
                    "holds"
                },
                dir.display()
            ));
        }
    }
    if let Some(root) = within {
        let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
        if !real.starts_with(&root) {
            return Err(format!(
                "{shown} is outside the plugin's directory {}: a manifest may only request \
                 directories inside it",
                root.display()
            ));
        }
    }
    Ok(real)
}

/// Checks an environment variable's name (a grant passes the host's value through).
pub(crate) fn check_env(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(format!(
            "`{}` is not an environment variable name",
            crate::term::escape(name)
        ));
    }
    Ok(())
}

/// A one-line account of permissions, for `validate`, `run` and `inspect`.
pub(crate) fn describe(p: &Permissions) -> String {
    let mut parts: Vec<String> = p
        .read_only_dirs
        .iter()
        .map(|(host, guest)| format!("{guest} (read-only, host {})", host.display()))
        .collect();
    if !p.env.is_empty() {
        parts.push(format!("env {}", p.env.join(", ")));
    }
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_and_own_directories_are_never_granted_even_through_symlinks() {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let cache = tmp.path().join("cache");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(cache.join("inner")).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        let mut protected = Protected::default();
        protected.add(&cache, "the cache");

        assert!(check_dir(&data, &protected, None).is_ok());
        for bad in ["/", "/proc", "/proc/self", "/sys", "/dev"] {
            let e = check_dir(Path::new(bad), &protected, None).unwrap_err();
            assert!(e.contains("never granted"), "{bad}: {e}");
        }
        // `..` and symlinks are resolved before comparing.
        let e = check_dir(&data.join("../cache/inner"), &protected, None).unwrap_err();
        assert!(e.contains("is inside the cache"), "{e}");
        let e = check_dir(tmp.path(), &protected, None).unwrap_err();
        assert!(e.contains("holds the cache"), "{e}");
        let link = tmp.path().join("to-proc");
        std::os::unix::fs::symlink("/proc", &link).expect("symlink");
        let e = check_dir(&link, &protected, None).unwrap_err();
        assert!(
            e.contains("resolved to /proc") && e.contains("never granted"),
            "{e}"
        );
        // A manifest may only request inside its own directory.
        let e = check_dir(&data, &protected, Some(&cache)).unwrap_err();
        assert!(e.contains("outside the plugin's directory"), "{e}");
        assert!(check_dir(&cache.join("inner"), &Protected::default(), Some(&cache)).is_ok());
    }
}
