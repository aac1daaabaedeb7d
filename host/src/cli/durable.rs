//! `routilux run --durable DIR [--resume]`: the job's header (what it runs, by hash), and the
//! checks that a resume runs the same flow, plugins and input as the job it continues.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{JobStore, Resumed};

/// What a durable job runs, written into its store when it is created and compared by a
/// resume: a changed flow file, plugin or input would make the store's queues and state mean
/// something else.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The flow file and the SHA-256 of its bytes.
    pub flow: Hashed,
    /// Every component the flow loads.
    pub components: Vec<Hashed>,
    /// Every input, in the order it is fed: `post.N` (the JSON posted) or `input.N` (a file).
    pub inputs: Vec<InputId>,
    /// The flow's routines in the store's order (its routine numbers), each with its slots:
    /// what names the store's contents (`routilux job`).
    pub routines: Vec<(String, Vec<String>)>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(crate) struct Hashed {
    pub path: String,
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(crate) struct InputId {
    /// Its name in the store (`post.0`, `input.1`, …).
    pub name: String,
    /// `routine.slot`.
    pub to: String,
    /// The JSON of a post, or the file of an input with its hash.
    #[serde(flatten)]
    pub what: InputWhat,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InputWhat {
    Post(String),
    File(Hashed),
}

/// The SHA-256 of a file's bytes, read in pieces (an input may be large).
pub(crate) fn hash_file(path: &Path) -> Result<Hashed, String> {
    // By its full path, so that a resume from another directory finds the same file.
    let path = &std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Hashed {
        path: path.display().to_string(),
        sha256: format!("{:x}", h.finalize()),
    })
}

/// Why `--durable DIR` could not be opened.
pub(crate) enum OpenError {
    /// The command line does not fit what `DIR` holds (exit 2).
    Usage(String),
    /// The store cannot be made or read (exit 1).
    Store(String),
}

/// Opens the store in `dir` for a new job (`resume` false: it must hold none) or to resume
/// the one there (`resume`: it must hold one of this very flow, plugins and input, not
/// completed). The error says what is wrong and what to do; it is [`OpenError::Store`] when
/// the store itself cannot be made or read (a full or failing disk, a damaged file).
pub(crate) fn open(dir: &Path, header: &Header, resume: bool) -> Result<JobStore, OpenError> {
    use OpenError::Usage;
    let text = serde_json::to_vec(header).map_err(|e| Usage(e.to_string()))?;
    let exists = dir.join("job.redb").exists();
    if exists && !resume {
        return Err(Usage(format!(
            "{} already holds a durable job: add --resume to continue it, or give --durable \
             a new directory",
            dir.display()
        )));
    }
    if !exists && resume {
        return Err(Usage(format!(
            "--resume: {} holds no durable job to resume (run without --resume to start one \
             there)",
            dir.display()
        )));
    }
    if let Ok(meta) = std::fs::metadata(dir)
        && !meta.is_dir()
    {
        return Err(Usage(format!(
            "--durable {}: not a directory",
            dir.display()
        )));
    }
    let store = JobStore::open(dir, &text).map_err(OpenError::Store)?;
    if resume {
        let r = store.resumed();
        let stored: Header = serde_json::from_slice(&r.header).map_err(|e| {
            OpenError::Store(format!(
                "--resume: the job store in {} has a header this routilux cannot read: {e}",
                dir.display()
            ))
        })?;
        if let Some(diff) = differs(&stored, header) {
            return Err(OpenError::Usage(format!(
                "--resume: cannot continue the job in {}: {diff}. A resumed job must run the \
                 same flow, plugins and input as the job it continues; start a new job in \
                 another directory instead",
                dir.display()
            )));
        }
        if r.status.as_deref() == Some("completed") {
            return Err(OpenError::Usage(format!(
                "--resume: the job in {} has completed; there is nothing to resume",
                dir.display()
            )));
        }
    }
    Ok(store)
}

/// What differs between the header a job was created with and the one of this run.
fn differs(stored: &Header, now: &Header) -> Option<String> {
    let changed = |what: &str, a: &Hashed, b: &Hashed| {
        if a.path != b.path {
            Some(format!("the {what} was {}, now {}", a.path, b.path))
        } else if a.sha256 != b.sha256 {
            Some(format!(
                "the {what} {} changed since the job started (SHA-256 {}…, now {}…)",
                a.path,
                &a.sha256[..12.min(a.sha256.len())],
                &b.sha256[..12.min(b.sha256.len())]
            ))
        } else {
            None
        }
    };
    if let Some(d) = changed("flow file", &stored.flow, &now.flow) {
        return Some(d);
    }
    let by_path = |v: &[Hashed]| -> BTreeMap<String, String> {
        v.iter()
            .map(|h| (h.path.clone(), h.sha256.clone()))
            .collect()
    };
    let (a, b) = (by_path(&stored.components), by_path(&now.components));
    for (path, hash) in &a {
        match b.get(path) {
            None => return Some(format!("the plugin {path} is no longer used")),
            Some(h) if h != hash => {
                return changed(
                    "plugin",
                    &Hashed {
                        path: path.clone(),
                        sha256: hash.clone(),
                    },
                    &Hashed {
                        path: path.clone(),
                        sha256: h.clone(),
                    },
                );
            }
            Some(_) => {}
        }
    }
    if let Some(path) = b.keys().find(|p| !a.contains_key(*p)) {
        return Some(format!("the plugin {path} is new"));
    }
    if stored.inputs.len() != now.inputs.len() {
        return Some(format!(
            "the job was started with {} inputs (--post, --input, the flow's `input:`), this \
             run gives {}",
            stored.inputs.len(),
            now.inputs.len()
        ));
    }
    for (a, b) in stored.inputs.iter().zip(&now.inputs) {
        if a.to != b.to {
            return Some(format!("{} went to {}, now to {}", a.name, a.to, b.to));
        }
        match (&a.what, &b.what) {
            (InputWhat::File(x), InputWhat::File(y)) => {
                if let Some(d) = changed("input file", x, y) {
                    return Some(d);
                }
            }
            (InputWhat::Post(x), InputWhat::Post(y)) if x == y => {}
            _ => return Some(format!("{} is not the same input", a.name)),
        }
    }
    None
}

/// The line telling what a resumed store held.
pub(crate) fn resumed_line(r: &Resumed) -> String {
    let mut parts = vec![format!(
        "{} queued item{}",
        r.queued,
        if r.queued == 1 { "" } else { "s" }
    )];
    parts.push(format!("{} dead letters", r.dead_letters));
    parts.push(format!("{} WorkerState keys", r.state_keys));
    if let Some(s) = &r.status {
        parts.push(format!("last {s}"));
    }
    if r.armed_retries > 0 {
        parts.push(format!("{} armed retries", r.armed_retries));
    }
    for (name, pos) in &r.inputs {
        if let Some(line) = name.strip_suffix(".lines") {
            parts.push(format!("{line} read to line {pos}"));
        }
    }
    if r.paused {
        parts.push("paused still (SIGUSR2 resumes it)".to_string());
    }
    format!(
        "resuming the job in {}: {}",
        r.dir.display(),
        parts.join(", ")
    )
}

/// `routilux job DIR`: what a durable job's store holds, named by the job's header.
pub(crate) fn show(dir: &Path, json: bool) -> super::Code {
    use super::Code;
    if !dir.join("job.redb").exists() {
        errln!("error: {} holds no durable job", dir.display());
        return Code::Usage;
    }
    let store = match JobStore::open(dir, b"") {
        Ok(s) => s,
        Err(e) => {
            errln!("error: {e}");
            return Code::Failed;
        }
    };
    let r = store.resumed();
    let header: Option<Header> = serde_json::from_slice(&r.header).ok();
    let routines = header
        .as_ref()
        .map(|h| h.routines.clone())
        .unwrap_or_default();
    let routine = |n: u32| {
        routines
            .get(n as usize)
            .map_or_else(|| format!("#{n}"), |(id, _)| id.clone())
    };
    let slot = |n: u32, s: u32| {
        routines
            .get(n as usize)
            .and_then(|(_, slots)| slots.get(s as usize))
            .map_or_else(|| format!("#{s}"), Clone::clone)
    };
    let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap_or_default();
    if json {
        let out = serde_json::json!({
            "dir": dir,
            "status": r.status,
            "paused": r.paused,
            "armed_retries": r.armed_retries,
            "header": header,
            "inputs": r.inputs,
            "queued": store.queued().map(|(n, s, item)| serde_json::json!({
                "routine": routine(n), "slot": slot(n, s), "item": parse(item)
            })).collect::<Vec<_>>(),
            "state": store.state().map(|(n, k, v)| serde_json::json!({
                "routine": routine(n), "key": k, "value": parse(v)
            })).collect::<Vec<_>>(),
            "dead_letters": store.dead_letters().map(parse).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Code::Ok;
    }
    let mut queued: BTreeMap<String, u64> = BTreeMap::new();
    for (n, s, _) in store.queued() {
        *queued
            .entry(format!("{}.{}", routine(n), slot(n, s)))
            .or_default() += 1;
    }
    let mut keys: BTreeMap<String, u64> = BTreeMap::new();
    for (n, _, _) in store.state() {
        *keys.entry(routine(n)).or_default() += 1;
    }
    outln!(
        "durable job in {}: {}{}",
        dir.display(),
        r.status.as_deref().unwrap_or("unfinished"),
        if r.paused { ", paused" } else { "" }
    );
    if let Some(h) = &header {
        outln!("  flow: {}", crate::term::escape(&h.flow.path));
    }
    for (name, pos) in &r.inputs {
        outln!("  input {name}: {pos}");
    }
    for (at, n) in &queued {
        outln!("  queued in {}: {n}", crate::term::escape(at));
    }
    for (at, n) in &keys {
        outln!("  WorkerState of {}: {n} keys", crate::term::escape(at));
    }
    outln!("  dead letters: {}", r.dead_letters);
    Code::Ok
}
