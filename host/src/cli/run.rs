//! `routilux run`: one job of a flow file, output streamed, a summary at the end.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use serde::Serialize;

use super::load::{Loaded, PluginOptions, load};
use super::{Code, print_diagnostics};
use crate::term::escape;
use crate::{Item, JobHandle, JobStatus, JobSummary, OutputLine, Runtime, RuntimeError};

/// What `run` was asked to do.
pub(crate) struct RunArgs {
    pub flow: PathBuf,
    pub plugins: PluginOptions,
    pub posts: Vec<String>,
    pub inputs: Vec<String>,
    pub threads: Option<usize>,
    pub timeout: Option<Duration>,
    pub json: bool,
    pub quiet: bool,
    pub raw: bool,
    pub dead_letters: Option<PathBuf>,
    /// `--durable DIR`.
    pub durable: Option<PathBuf>,
    /// `--resume`.
    pub resume: bool,
}

/// `routine.slot`, or `None` for the flow's entry slot.
type Target = Option<(String, String)>;

/// Splits `routine.slot=REST` (the prefix is optional).
fn split_target(arg: &str) -> (Target, &str) {
    if let Some((head, rest)) = arg.split_once('=')
        && let Some((r, s)) = head.split_once('.')
        && [r, s].iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        })
    {
        return (Some((r.to_owned(), s.to_owned())), rest);
    }
    (None, arg)
}

/// Where an input goes: the named slot, or the flow's only entry slot.
fn resolve(target: Target, loaded: &Loaded, what: &str) -> Result<(String, String), String> {
    if let Some(t) = target {
        return Ok(t);
    }
    match loaded.entries.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "{what}: the flow has no entry slot (every slot is fed by a connection); name one \
             as `routine.slot=...`"
        )),
        many => Err(format!(
            "{what}: the flow has several entry slots ({}); name one as `routine.slot=...`",
            many.iter()
                .map(|(r, s)| format!("{r}.{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A source of items for the job.
enum Feed {
    One {
        to: (String, String),
        item: Item,
    },
    File {
        to: (String, String),
        path: PathBuf,
        file: std::fs::File,
    },
}

/// Prints routine output as it happens, around the progress line.
struct Printer {
    bar: ProgressBar,
    /// Routine stdout goes to stdout, unless stdout carries the JSON summary.
    stdout_for_output: bool,
    /// Routine stdout unchanged (`--raw`), for pipes.
    raw: bool,
}

impl Printer {
    fn line(&self, line: &OutputLine) {
        self.bar.suspend(|| {
            // A closed pipe (`| head`) is not an error of the job. Guest text is escaped for
            // the terminal unless `--raw` asked for routine stdout unchanged.
            if line.level == "stdout" && self.stdout_for_output {
                let mut out = std::io::stdout().lock();
                let _ = if self.raw {
                    writeln!(out, "{}", line.message)
                } else {
                    writeln!(out, "{}", escape(&line.message))
                };
            } else {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "[{}] {}: {}",
                    escape(&line.routine),
                    line.level,
                    escape(&line.message)
                );
            }
        });
    }
}

/// The summary printed with `--json`.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    summary: &'a JobSummary,
    timed_out: bool,
    exit_code: u8,
    items_posted: u64,
    components: Vec<JsonComponent>,
    /// The process's peak resident memory (Linux `VmHWM`), if known.
    peak_rss_bytes: Option<u64>,
    /// Where every dead letter was written (`--dead-letters`).
    dead_letters_file: Option<PathBuf>,
    /// The durable job's store: what it held when opened (`--durable`).
    durable: Option<crate::Resumed>,
}

/// The peak resident set of this process, from `/proc/self/status` (Linux).
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Every dead letter, one JSON object per line, written as it is made.
struct DeadLetterFile {
    path: PathBuf,
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    failed: std::sync::atomic::AtomicBool,
}

impl DeadLetterFile {
    fn create(path: &Path) -> Result<Self, String> {
        let file = std::fs::File::create(path)
            .map_err(|e| format!("--dead-letters {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: Mutex::new(std::io::BufWriter::new(file)),
            failed: Default::default(),
        })
    }

    fn write(&self, job: crate::JobId, letter: &crate::DeadLetter) {
        let line = serde_json::json!({"job": job.to_string(), "dead_letter": letter});
        let mut out = self.out.lock();
        if writeln!(out, "{line}").is_err() && !self.failed.swap(true, Ordering::Relaxed) {
            errln!(
                "error: cannot write dead letters to {}",
                self.path.display()
            );
        }
    }

    fn finish(&self) -> bool {
        self.out.lock().flush().is_ok() && !self.failed.load(Ordering::Relaxed)
    }
}

#[derive(Serialize)]
struct JsonComponent {
    path: PathBuf,
    from_cache: bool,
}

pub(crate) fn run(args: RunArgs) -> Code {
    // SIGUSR1 / SIGUSR2 pause and resume the job; caught from the start, so that one sent
    // while the plugins load (whose default action would kill the process) pauses the job as
    // it starts. Ctrl-C and SIGTERM are caught once the job runs (before, they end the
    // process at once, a long `--build` included).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
    ])
    .map_err(|e| tracing::warn!("cannot catch SIGUSR1 and SIGUSR2: {e}"))
    .ok();
    let Some(engine) = super::engine() else {
        return Code::Failed;
    };
    let loaded = match load(&args.flow, &engine, &args.plugins) {
        Ok(l) => l,
        Err(diags) => {
            print_diagnostics(&diags);
            return Code::Invalid;
        }
    };
    print_diagnostics(&loaded.warnings);
    if !args.quiet {
        for line in super::grant_lines(&loaded.grants) {
            errln!("{line}");
        }
        for (path, from_cache) in &loaded.components {
            errln!(
                "using {} ({})",
                path.display(),
                if *from_cache {
                    "from the compiled cache"
                } else {
                    "compiled now, cached for next time"
                }
            );
        }
    }

    let feeds = match feeds(&args, &loaded) {
        Ok(f) => f,
        Err(e) => {
            errln!("error: {e}");
            return Code::Usage;
        }
    };

    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    let show_progress = !args.json && !args.quiet && std::io::stderr().is_terminal();
    let printer = Arc::new(Printer {
        bar: bar.clone(),
        stdout_for_output: !args.json,
        raw: args.raw,
    });
    let threads = args
        .threads
        .or(loaded.threads)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let p = printer.clone();
    let dead_file = match args.dead_letters.as_deref().map(DeadLetterFile::create) {
        None => None,
        Some(Ok(f)) => Some(Arc::new(f)),
        Some(Err(e)) => {
            errln!("error: {e}");
            return Code::Usage;
        }
    };
    let mut builder = Runtime::builder()
        .thread_pool_size(threads)
        // Feeding waits on backpressure for as long as the job runs; `--timeout` bounds it.
        .post_timeout(Duration::from_secs(365 * 86_400))
        .on_output(move |_, line| p.line(line));
    if let Some(f) = &dead_file {
        let f = f.clone();
        builder = builder.on_dead_letter(move |job, letter| f.write(job, letter));
    }
    let runtime = match builder.try_build() {
        Ok(r) => r,
        Err(e) => {
            errln!("error: cannot start {threads} worker threads: {e}");
            return Code::Failed;
        }
    };
    if let Err(e) = runtime.register(&loaded.flow_id, &loaded.flow) {
        errln!("error: {e}");
        return Code::Invalid;
    }
    let store = match &args.durable {
        None => None,
        Some(dir) => match header(&args.flow, &loaded, &feeds, &runtime)
            .map_err(super::durable::OpenError::Usage)
            .and_then(|h| super::durable::open(dir, &h, args.resume))
        {
            Ok(s) => Some(s),
            Err(super::durable::OpenError::Usage(e)) => {
                errln!("error: {e}");
                return Code::Usage;
            }
            // The store cannot be made or read: a full or failing disk, a damaged file.
            Err(super::durable::OpenError::Store(e)) => {
                errln!("error: {e}");
                return Code::Failed;
            }
        },
    };
    let resumed = store.as_ref().map(|s| s.resumed().clone());
    if let Some(r) = &resumed
        && !r.created
        && !args.quiet
    {
        errln!("{}", super::durable::resumed_line(r));
    }
    let positions = resumed
        .as_ref()
        .map(|r| r.inputs.clone())
        .unwrap_or_default();
    // The job's time starts now: loading and compiling the plugins is not the job's.
    let job_started = Instant::now();
    let (job, durable_hold) = match store {
        None => match runtime.exec(&loaded.flow_id) {
            Ok(j) => (j, None),
            Err(e) => {
                errln!("error: {e}");
                return Code::Failed;
            }
        },
        Some(store) => match runtime.exec_durable(&loaded.flow_id, store) {
            Ok((j, h)) => (j, Some(h)),
            Err(e) => {
                errln!("error: {e}");
                return Code::Failed;
            }
        },
    };

    // Check every target before feeding anything.
    let mut inputs = Vec::new();
    for f in &feeds {
        let (r, s) = match f {
            Feed::One { to, .. } | Feed::File { to, .. } => to,
        };
        match job.input(r, s) {
            Ok(i) => inputs.push(i),
            Err(e) => {
                job.cancel();
                errln!("error: {e}");
                return Code::Usage;
            }
        }
    }
    let hold = match durable_hold.map_or_else(|| job.hold_open(), Ok) {
        Ok(h) => h,
        Err(e) => {
            errln!("error: {e}");
            return Code::Failed;
        }
    };
    let posted = Arc::new(AtomicU64::new(0));
    let input_error: Arc<Mutex<Option<String>>> = Arc::default();
    let feeder = {
        let (posted, input_error) = (posted.clone(), input_error.clone());
        std::thread::Builder::new()
            .name("routilux-input".into())
            .spawn(move || {
                let _hold = hold;
                for (i, (feed, input)) in feeds.into_iter().zip(inputs).enumerate() {
                    let result = match feed {
                        // Posted already by the job this one resumes.
                        Feed::One { .. } if positions.contains_key(&format!("post.{i}")) => Ok(()),
                        Feed::One { item, .. } => input
                            .post_items(vec![item], vec![(format!("post.{i}"), 1)])
                            .map(|()| {
                                posted.fetch_add(1, Ordering::Relaxed);
                            })
                            .map_err(|_: RuntimeError| Fault::Post),
                        Feed::File { path, file, .. } => {
                            let name = format!("input.{i}");
                            let from = Position {
                                byte: positions.get(&name).copied().unwrap_or(0),
                                line: positions
                                    .get(&format!("{name}.lines"))
                                    .copied()
                                    .unwrap_or(0),
                            };
                            feed_file(&path, file, &input, &posted, &name, from)
                        }
                    };
                    match result {
                        Ok(()) => {}
                        // The job halted (failed or cancelled): the summary says why.
                        Err(Fault::Post) => return,
                        // Bad input: no more is taken, and what was posted before it is
                        // processed (the job completes with it); the run then exits 2.
                        Err(Fault::Input(e)) => {
                            *input_error.lock() = Some(e);
                            return;
                        }
                    }
                }
            })
    };
    let feeder = match feeder {
        Ok(f) => f,
        Err(e) => {
            job.cancel();
            errln!("error: cannot start the input thread: {e}");
            return Code::Failed;
        }
    };

    let timeout = args.timeout.or(loaded.timeout);
    // A timeout too long to represent means none.
    let deadline = timeout.and_then(|t| job_started.checked_add(t));
    let style = ProgressStyle::with_template("{spinner} {elapsed} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    bar.set_style(style);
    let mut timed_out = false;
    let mut shown = false;
    // Ctrl-C / SIGTERM: the first stops the job gently (no more input or new activations, the
    // running ones finish), the second cancels it; the summary is printed either way.
    if let Some(s) = &signals
        && let Err(e) = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]
            .into_iter()
            .try_for_each(|sig| s.add_signal(sig))
    {
        tracing::warn!("cannot catch Ctrl-C and SIGTERM: {e}");
    }
    let mut interrupted: Option<i32> = None;
    loop {
        if job.wait(Duration::from_millis(100)) {
            break;
        }
        for sig in signals
            .as_mut()
            .map(|s| s.pending().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            // SIGUSR1 pauses the job, SIGUSR2 resumes it.
            if sig == signal_hook::consts::SIGUSR1 || sig == signal_hook::consts::SIGUSR2 {
                let pause = sig == signal_hook::consts::SIGUSR1;
                let changed = if pause { job.pause() } else { job.resume() };
                if changed {
                    bar.suspend(|| {
                        if pause {
                            errln!(
                                "routilux: SIGUSR1: paused — no new activation until SIGUSR2 \
                                 (queues are kept; the job does not finish while paused)"
                            );
                        } else {
                            errln!("routilux: SIGUSR2: resumed");
                        }
                    });
                }
                continue;
            }
            let name = if sig == signal_hook::consts::SIGTERM {
                "SIGTERM"
            } else {
                "Ctrl-C"
            };
            bar.suspend(|| {
                if interrupted.is_none() {
                    errln!(
                        "routilux: {name}: stopping — no more input, no new activation; the \
                         running ones finish (again to cancel them)"
                    );
                } else {
                    errln!("routilux: {name} again: cancelling");
                }
            });
            if interrupted.is_none() {
                interrupted = Some(sig);
                job.stop();
            } else {
                job.cancel();
            }
        }
        if show_progress {
            if !shown && job_started.elapsed() > Duration::from_secs(1) {
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.enable_steady_tick(Duration::from_millis(200));
                shown = true;
            }
            if shown {
                bar.set_message(progress(&job, job_started));
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            job.cancel();
            job.wait(Duration::from_secs(10));
            break;
        }
    }
    bar.finish_and_clear();
    let _ = feeder.join();
    let mut store_failed = false;
    if let Some(Err(e)) = job.sync_store() {
        errln!("error: {e}");
        store_failed = true;
    }
    let summary = job.summary();
    if let Some(f) = &dead_file
        && !f.finish()
    {
        errln!("error: cannot write dead letters to {}", f.path.display());
    }
    let input_error = input_error.lock().take();
    let code = if store_failed {
        Code::Failed
    } else if let Some(sig) = interrupted {
        if sig == signal_hook::consts::SIGTERM {
            Code::Terminated
        } else {
            Code::Interrupted
        }
    } else if let Some(e) = &input_error {
        errln!("error: {e}");
        Code::Usage
    } else if timed_out {
        Code::Timeout
    } else {
        match summary.status {
            JobStatus::Completed => Code::Ok,
            _ => Code::Failed,
        }
    };
    if args.json {
        let report = JsonReport {
            summary: &summary,
            timed_out,
            exit_code: code as u8,
            items_posted: posted.load(Ordering::Relaxed),
            components: loaded
                .components
                .iter()
                .map(|(path, from_cache)| JsonComponent {
                    path: path.clone(),
                    from_cache: *from_cache,
                })
                .collect(),
            peak_rss_bytes: peak_rss_bytes(),
            dead_letters_file: args.dead_letters.clone(),
            durable: resumed.clone(),
        };
        match serde_json::to_string_pretty(&report) {
            Ok(s) => outln!("{s}"),
            Err(e) => errln!("error: cannot write the summary: {e}"),
        }
    } else if !args.quiet || code != Code::Ok {
        print_summary(
            &summary,
            timed_out,
            timeout,
            posted.load(Ordering::Relaxed),
            args.dead_letters.as_deref(),
        );
    }
    runtime.shutdown(crate::Shutdown::Cancel);
    code
}

/// Why feeding stopped.
enum Fault {
    /// The job refused input (it halted).
    Post,
    /// The input itself is bad.
    Input(String),
}

/// How far an input file was read: the byte offset and the lines before it.
#[derive(Clone, Copy, Default)]
struct Position {
    byte: u64,
    line: u64,
}

/// Lines posted to a durable job in one unit at most (and at most [`UNIT_BYTES`]): they are
/// committed together, with the position reached, in one transaction.
const UNIT_LINES: usize = 512;
const UNIT_BYTES: u64 = 1 << 20;

/// Posts every line of a JSON-lines file, from `from` on (where a resumed job's input had
/// reached). A line longer than the target slot's byte budget (it could never be queued) is
/// refused after reading at most that much of it, so `/dev/zero` or a 1 GiB line is an
/// error, not a memory exhaustion.
///
/// To a durable job, lines go in units (up to [`UNIT_LINES`] lines or [`UNIT_BYTES`], fewer
/// when the reader has no more at hand), each committed with the position after its last
/// line as `NAME` (bytes) and `NAME.lines`: a line counts as read once its unit is on disk.
fn feed_file(
    path: &Path,
    mut file: std::fs::File,
    input: &crate::Input,
    posted: &AtomicU64,
    name: &str,
    from: Position,
) -> Result<(), Fault> {
    use std::io::{Seek, SeekFrom};
    let max_line = input.byte_budget();
    let durable = input.is_durable();
    if from.byte > 0 {
        file.seek(SeekFrom::Start(from.byte))
            .map_err(|e| Fault::Input(format!("{}: {e}", path.display())))?;
    }
    let mut reader = BufReader::with_capacity(if durable { 1 << 20 } else { 8 << 10 }, file);
    let mut buf = Vec::new();
    let mut at = from;
    let mut unit: Vec<Item> = Vec::new();
    let mut unit_bytes = 0;
    let flush = |unit: &mut Vec<Item>, at: Position| -> Result<(), Fault> {
        if unit.is_empty() {
            return Ok(());
        }
        let n = unit.len() as u64;
        input
            .post_items(
                std::mem::take(unit),
                vec![
                    (name.to_owned(), at.byte),
                    (format!("{name}.lines"), at.line),
                ],
            )
            .map_err(|_| Fault::Post)?;
        posted.fetch_add(n, Ordering::Relaxed);
        Ok(())
    };
    loop {
        buf.clear();
        let read = (&mut reader)
            .take(max_line + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Fault::Input(format!("{}: {e}", path.display())))?;
        if read == 0 {
            break;
        }
        let n = at.line + 1;
        if buf.last() != Some(&b'\n') && buf.len() as u64 > max_line {
            flush(&mut unit, at)?;
            return Err(Fault::Input(format!(
                "{}:{n}: the line is longer than {}, the byte budget of the slot it would go to",
                path.display(),
                crate::model::budget::bytes(max_line)
            )));
        }
        let parsed = match std::str::from_utf8(&buf) {
            Ok(l) => {
                let line = l.trim_end_matches(['\n', '\r']);
                if line.trim().is_empty() {
                    None
                } else {
                    Some(
                        Item::from_json_text(line)
                            .map_err(|e| format!("{}:{n}: {e}", path.display())),
                    )
                }
            }
            Err(e) => Some(Err(format!("{}:{n}: not UTF-8: {e}", path.display()))),
        };
        let item = match parsed {
            None => None,
            Some(Ok(item)) => Some(item),
            Some(Err(e)) => {
                // What came before the bad line is posted (and, durably, committed).
                flush(&mut unit, at)?;
                return Err(Fault::Input(e));
            }
        };
        at = Position {
            byte: at.byte + read as u64,
            line: n,
        };
        let Some(item) = item else {
            continue;
        };
        if !durable {
            input.post_item(item).map_err(|e: RuntimeError| match e {
                RuntimeError::ItemTooLarge { .. } => {
                    Fault::Input(format!("{}:{n}: {e}", path.display()))
                }
                _ => Fault::Post,
            })?;
            posted.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        unit_bytes += item.byte_len() as u64;
        unit.push(item);
        if unit.len() >= UNIT_LINES || unit_bytes >= UNIT_BYTES || reader.buffer().is_empty() {
            flush(&mut unit, at)?;
            unit_bytes = 0;
        }
    }
    flush(&mut unit, at)
}

/// The header of a durable job: the flow file, its components and its input, by hash.
fn header(
    flow: &Path,
    loaded: &Loaded,
    feeds: &[Feed],
    runtime: &Runtime,
) -> Result<super::durable::Header, String> {
    use super::durable::{Header, InputId, InputWhat, hash_file};
    let inputs = feeds
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok(match f {
                Feed::One { to, item } => InputId {
                    name: format!("post.{i}"),
                    to: format!("{}.{}", to.0, to.1),
                    what: InputWhat::Post(item.json_str().to_owned()),
                },
                Feed::File { to, path, .. } => InputId {
                    name: format!("input.{i}"),
                    to: format!("{}.{}", to.0, to.1),
                    what: InputWhat::File(hash_file(path)?),
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Header {
        flow: hash_file(flow)?,
        components: loaded
            .components
            .iter()
            .map(|(p, _)| hash_file(p))
            .collect::<Result<_, _>>()?,
        inputs,
        routines: runtime
            .registry()
            .get(&loaded.flow_id)
            .map(|c| {
                c.plan
                    .routines
                    .iter()
                    .map(|r| {
                        (
                            r.id.to_string(),
                            r.slot_names.iter().map(|s| s.to_string()).collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Parses `--post` and opens `--input` files, resolving their targets.
fn feeds(args: &RunArgs, loaded: &Loaded) -> Result<Vec<Feed>, String> {
    let mut out = Vec::new();
    for p in &args.posts {
        let (target, json) = split_target(p);
        let item = Item::from_json_text(json).map_err(|e| format!("--post `{p}`: {e}"))?;
        let to = resolve(target, loaded, "--post")?;
        out.push(Feed::One { to, item });
    }
    for i in &args.inputs {
        let (target, file) = split_target(i);
        let to = resolve(target, loaded, "--input")?;
        let path = PathBuf::from(file);
        let file =
            std::fs::File::open(&path).map_err(|e| format!("--input {}: {e}", path.display()))?;
        out.push(Feed::File { to, path, file });
    }
    if out.is_empty() {
        for (to, items) in &loaded.input {
            for item in items {
                out.push(Feed::One {
                    to: to.clone(),
                    item: item.clone(),
                });
            }
        }
    }
    if out.is_empty() {
        let entries: Vec<String> = loaded
            .entries
            .iter()
            .map(|(r, s)| format!("{r}.{s}"))
            .collect();
        return Err(format!(
            "nothing to run: give items with --post [routine.slot=]JSON or --input \
             [routine.slot=]FILE.jsonl, or an `input:` in the flow file (entry slots: {})",
            if entries.is_empty() {
                "none".to_owned()
            } else {
                entries.join(", ")
            }
        ));
    }
    Ok(out)
}

/// The progress line: items done and the rate.
fn progress(job: &JobHandle, started: Instant) -> String {
    let counters = job.counters();
    let processed: u64 = counters.values().map(|c| c.processed).sum();
    let activations: u64 = counters.values().map(|c| c.activations).sum();
    let queued: u64 = counters.values().map(|c| c.queued).sum();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    format!(
        "{processed} items processed ({:.0}/s), {activations} activations, {queued} queued",
        processed as f64 / secs
    )
}

fn print_summary(
    s: &JobSummary,
    timed_out: bool,
    timeout: Option<Duration>,
    posted: u64,
    dead_letters: Option<&Path>,
) {
    let mut e = std::io::stderr().lock();
    let status = if timed_out {
        format!(
            "timed out after {}",
            humantime::format_duration(timeout.unwrap_or_default())
        )
    } else {
        s.status.to_string()
    };
    let _ = writeln!(
        e,
        "\n{} of flow `{}`: {status} in {} ms ({posted} item{} posted)",
        s.job,
        escape(&s.flow),
        s.wall_time_ms,
        if posted == 1 { "" } else { "s" }
    );
    if let Some(f) = &s.failure {
        let _ = writeln!(e, "  failure: {}", escape(f));
    }
    let width = s
        .routines
        .keys()
        .map(|k| escape(k).chars().count())
        .max()
        .unwrap_or(0)
        .max("routine".len());
    let _ = writeln!(
        e,
        "  {:<width$}  {:>11}  {:>8}  {:>8}  {:>6}  {:>12}",
        "routine", "activations", "items in", "out", "errors", "dead letters"
    );
    for (name, c) in &s.routines {
        let _ = writeln!(
            e,
            "  {:<width$}  {:>11}  {:>8}  {:>8}  {:>6}  {:>12}",
            escape(name),
            c.activations,
            c.items_in,
            c.items_out,
            c.errors,
            c.dead_lettered
        );
    }
    for f in s.errors.iter().take(10) {
        let _ = writeln!(
            e,
            "  error in `{}` (attempt {}, {}): {}",
            escape(&f.routine),
            f.attempts,
            f.strategy,
            escape(&f.error)
        );
    }
    if s.errors.len() > 10 {
        let _ = writeln!(e, "  … and {} more errors", s.errors.len() - 10);
    }
    if s.left_in_store > 0 {
        let _ = writeln!(
            e,
            "  {} items unfinished: the job store keeps them (or the items they came from) \
             queued, and --resume runs them",
            s.left_in_store
        );
    }
    if s.dead_lettered > 0 {
        let _ = writeln!(e, "  {} items dead-lettered", s.dead_lettered);
        match dead_letters {
            Some(path) => {
                let _ = writeln!(e, "  every dead letter is in {}", path.display());
            }
            None if s.dead_letters_dropped > 0 => {
                let _ = writeln!(
                    e,
                    "  {} dead letters ({} items) were past the job's dead-letter budget: \
                     counted, not kept (--dead-letters FILE.jsonl keeps every one)",
                    s.dead_letters_dropped, s.dead_letter_items_dropped
                );
            }
            None => {}
        }
    }
    if s.output_lines_dropped > 0 {
        let _ = writeln!(
            e,
            "  ({} earlier output lines were streamed and not kept)",
            s.output_lines_dropped
        );
    }
}

#[cfg(test)]
mod tests {
    use super::split_target;

    #[test]
    fn a_target_prefix_is_optional_and_json_may_hold_equals_signs() {
        assert_eq!(
            split_target(r#"a.b={"x":"y=z"}"#),
            (Some(("a".into(), "b".into())), r#"{"x":"y=z"}"#)
        );
        assert_eq!(split_target(r#"{"x":"y=z"}"#), (None, r#"{"x":"y=z"}"#));
        assert_eq!(split_target("in.jsonl"), (None, "in.jsonl"));
        assert_eq!(
            split_target("src.trigger=data/in.jsonl"),
            (Some(("src".into(), "trigger".into())), "data/in.jsonl")
        );
    }
}
