//! The `routilux` command-line tool: run, validate and inspect flows made of WebAssembly
//! plugins, scaffold and build plugins.
//!
//! | command | does |
//! | --- | --- |
//! | `run FLOW` | runs one job: streams routine output, ends with a summary |
//! | `validate FLOW` | reports every problem of a flow file at once, with file:line:column |
//! | `inspect PLUGIN.wasm` | kinds, slots, events, default config, capabilities |
//! | `new NAME --lang rust` | a plugin project that builds and runs on the first try |
//! | `build [DIR]` | builds a Rust plugin project for `wasm32-wasip2` |
//!
//! Exit codes: 0 success; 1 the job failed (or another failure); 2 bad command line or input;
//! 3 invalid flow or plugins; 4 timeout; 130 stopped by Ctrl-C, 143 by SIGTERM.

/// Writes a line to stdout. A closed pipe (`routilux run --json | head`) is not an error of
/// the command: the line is dropped, nothing panics.
macro_rules! outln {
    ($($t:tt)*) => { $crate::cli::out_line(format_args!($($t)*)) };
}

/// Writes a line (or a laid-out block) to stderr with control characters escaped (newlines
/// kept); a closed stderr is ignored.
macro_rules! errln {
    ($($t:tt)*) => { $crate::cli::err_line(format_args!($($t)*)) };
}

mod client;
mod diag;
mod durable;
mod file;
mod grants;
pub mod guests;
mod inspect;
mod load;
mod new;
pub mod plugins;
mod run;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::term;
use diag::Diagnostic;
use load::PluginOptions;

pub(crate) fn out_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

pub(crate) fn err_line(line: std::fmt::Arguments<'_>) {
    let text = line.to_string();
    let _ = writeln!(
        std::io::stderr().lock(),
        "{}",
        crate::term::escape_multiline(&text)
    );
}

/// The most worker threads a run may ask for (each reserves a 32 MiB stack).
pub(crate) const MAX_THREADS: usize = 1024;

/// Exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Code {
    /// The command did what it was asked (a job: completed).
    Ok = 0,
    /// The job failed or was cancelled, or the command could not do its work.
    Failed = 1,
    /// A bad command line or bad input items.
    Usage = 2,
    /// The flow file or its plugins are invalid.
    Invalid = 3,
    /// The job did not finish in time.
    Timeout = 4,
    /// Ctrl-C (SIGINT) stopped the run (128 + 2, as shells report it).
    Interrupted = 130,
    /// SIGTERM stopped the run (128 + 15).
    Terminated = 143,
}

#[derive(Parser)]
#[command(
    name = "routilux",
    version,
    about = "Run flows of sandboxed WebAssembly routines",
    long_about = "Run flows of sandboxed WebAssembly routines.\n\nA flow file (YAML or JSON) \
                  names routines by id (a plugin component and one of its kinds, with config, \
                  policy, limits, error strategy) and connects their events to slots.",
    after_help = "Exit codes: 0 success; 1 job failed; 2 bad command line or input; 3 invalid \
                  flow or plugins; 4 timeout; 130 stopped by Ctrl-C, 143 by SIGTERM (a first \
                  signal stops the job gently and prints the summary, a second cancels it)."
)]
struct Cli {
    /// How much the host logs to stderr: error, warn, info, debug or trace (`RUST_LOG`, if
    /// set, says more precisely, e.g. `routilux=debug`).
    #[arg(long, global = true, value_name = "LEVEL", default_value = "warn")]
    log_level: LogLevel,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Where log lines go: stderr, with control characters escaped (a log line may carry guest
/// text, such as an activation's error), each event's own final newline kept.
struct EscapedStderr;

impl std::io::Write for EscapedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (&*text, ""),
        };
        let mut err = std::io::stderr().lock();
        // A closed stderr is not the command's failure.
        let _ = write!(err, "{}{end}", term::escape(body));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Installs the log subscriber: `RUST_LOG` if set, else `--log-level` for everything.
fn install_logging(level: LogLevel) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v.trim()).unwrap_or_else(|e| {
            errln!("warning: RUST_LOG is not a log filter ({e}); using --log-level");
            EnvFilter::new(level.directive())
        }),
        _ => EnvFilter::new(level.directive()),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| EscapedStderr)
        .with_target(false)
        .without_time()
        .try_init();
}

#[derive(Subcommand)]
enum Command {
    /// Run one job of a flow: stream routine output, print a summary.
    Run(RunCommand),
    /// Show what a durable job's store holds (`run --durable DIR`): its status, how far each
    /// input got, its queued items, WorkerState and dead letters.
    Job {
        /// The job's directory.
        dir: PathBuf,
        /// Print JSON (every item, state value and dead letter).
        #[arg(long)]
        json: bool,
    },
    /// Serve many tenants' flows over an HTTP API (`/v1`) until SIGTERM or Ctrl-C.
    #[command(args_conflicts_with_subcommands = true)]
    Serve {
        #[command(subcommand)]
        action: Option<ServeAction>,
        /// The server's configuration (YAML: listen, data_dir, tenants with token hashes and
        /// quotas); without it, one tenant whose token is made at first start.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The address to listen on (`127.0.0.1:0` picks a free port; the bound address is
        /// printed). Default 127.0.0.1:7878.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Where tenants' plugins, flows and tokens are kept (default: the user's data
        /// directory, `~/.local/share/routilux/serve`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Deploy a flow file and the plugins it uses to a server (`routilux serve`).
    Deploy {
        /// The flow file (YAML or JSON); checked here first.
        flow: PathBuf,
        #[command(flatten)]
        plugins: PluginArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Post items to a server's job: start one of a flow (`--flow ID`), or post to a running
    /// one (`--job ID`).
    Post {
        /// Start a job of this deployed flow (its id is printed), closed after the items.
        #[arg(long, value_name = "ID", conflicts_with = "job")]
        flow: Option<String>,
        /// Post to this running job.
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// The target slot, `routine.slot` (default: the flow's only entry slot).
        #[arg(long, value_name = "ROUTINE.SLOT")]
        to: Option<String>,
        /// An item (a JSON object); repeatable.
        #[arg(long = "post", value_name = "JSON")]
        posts: Vec<String>,
        /// A file of items, one JSON object per line; repeatable.
        #[arg(long = "input", value_name = "FILE.jsonl")]
        inputs: Vec<PathBuf>,
        /// Leave a started job open for more input.
        #[arg(long)]
        keep_open: bool,
        /// Then follow the job's events to its end (as `jobs ID --follow`).
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// A server's jobs: all of them, one (status and summary), or one followed to its end.
    Jobs {
        /// A job id.
        id: Option<String>,
        /// Follow its events: routine output as it comes, until the job ends.
        #[arg(long, requires = "id")]
        follow: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Check a flow file and its plugins; report every problem at once.
    Validate {
        /// The flow file (YAML or JSON).
        flow: PathBuf,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Show what a component provides (kinds, slots, events, config) and what it imports.
    Inspect {
        /// A component (`.wasm`) or a directory of them.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a plugin project.
    New {
        /// The plugin's name (a crate name).
        name: String,
        /// Its language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: plugins::Lang,
        /// How a Python routine is written: class attributes and a `logic` method, or the
        /// reference library's `__init__` with `add_slot`, `set_logic`, ….
        #[arg(long, value_enum, default_value = "declarative")]
        style: new::Style,
        /// Where to create it (default: the current directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The routilux-sdk crate to depend on (default: the one this tool was built with).
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin project: Rust (Cargo.toml), Python (plugin.py), JavaScript (plugin.js)
    /// or C (plugin.c). Guest toolchains are installed on first use.
    Build {
        /// The project directory (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The engine JavaScript plugins are built with.
        #[arg(long, value_enum, default_value = "quickjs")]
        js_engine: guests::JsEngine,
    },
}

/// Which server, and the tenant's token.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The server's URL.
    #[arg(long, env = "ROUTILUX_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// The tenant's API token.
    #[arg(long, env = "ROUTILUX_TOKEN", hide_env_values = true)]
    token: String,
}

impl From<RemoteArgs> for client::Remote {
    fn from(a: RemoteArgs) -> Self {
        client::Remote {
            server: a.server,
            token: a.token,
        }
    }
}

#[derive(Subcommand)]
enum ServeAction {
    /// Make a new API token for the default tenant (replacing the stored ones), or with
    /// `--hash-only` a token and the hash a config file's `tokens:` takes.
    Token {
        /// The server's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print a token and its hash; store nothing.
        #[arg(long)]
        hash_only: bool,
    },
    /// Remove a tenant's data for good: its plugins, flows, jobs and their stores. Refused
    /// while a server has the tenant live (remove it from the configuration and reload
    /// first); without `--yes`, only says what it would remove.
    Purge {
        /// The tenant's id.
        tenant: String,
        /// The server's configuration (its data directory; the tenant must no longer be in
        /// it).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The server's data directory (when there is no configuration file).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Remove it (without this, nothing is removed).
        #[arg(long)]
        yes: bool,
    },
}

/// Where plugins come from (for `run` and `validate`).
#[derive(clap::Args)]
struct PluginArgs {
    /// A plugin directory (repeatable; searched before the flow file's `plugins:`).
    #[arg(long = "plugins", value_name = "DIR")]
    plugins: Vec<PathBuf>,
    /// Build plugin projects (Rust, Python, JavaScript, C) among the plugin directories first.
    #[arg(long)]
    build: bool,
    /// The engine JavaScript plugins are built with (with --build).
    #[arg(long, value_enum, default_value = "quickjs")]
    js_engine: guests::JsEngine,
    /// Grant what plugin manifests request: their read-only directories (inside their own
    /// plugin directory), environment variables and limits above the defaults. Without it a
    /// manifest may only lower limits; grants come from the flow file.
    #[arg(long)]
    grant_requests: bool,
}

impl From<PluginArgs> for PluginOptions {
    fn from(a: PluginArgs) -> Self {
        PluginOptions {
            dirs: a.plugins,
            build: a.build,
            js_engine: a.js_engine,
            grant_requests: a.grant_requests,
        }
    }
}

/// `routilux run`.
#[derive(clap::Args)]
struct RunCommand {
    /// The flow file (YAML or JSON).
    flow: PathBuf,
    #[command(flatten)]
    plugins: PluginArgs,
    /// Post one item: `[routine.slot=]JSON` (default: the flow's only entry slot).
    #[arg(long = "post", value_name = "[ROUTINE.SLOT=]JSON")]
    posts: Vec<String>,
    /// Post every line of a JSON-lines file: `[routine.slot=]FILE`.
    #[arg(long = "input", value_name = "[ROUTINE.SLOT=]FILE")]
    inputs: Vec<String>,
    /// Worker threads, 1 to 1024 (default: the flow's `execution.thread_pool_size`, else the
    /// CPUs).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_THREADS as i64))]
    threads: Option<u16>,
    /// Give up (cancel the job, exit 4) after the job has run this long, e.g. `30s` (loading
    /// and compiling the plugins does not count).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Print the summary as JSON on stdout (routine output goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress line, no summary unless the job fails.
    #[arg(long, short)]
    quiet: bool,
    /// Routine stdout unchanged, control characters included (for pipes); by default guest
    /// text is escaped for the terminal.
    #[arg(long)]
    raw: bool,
    /// Write every dead letter to this file as it is made, one JSON object per line (the job
    /// itself keeps them only within its dead-letter budget).
    #[arg(long, value_name = "FILE.jsonl")]
    dead_letters: Option<PathBuf>,
    /// Run the job durably in DIR (made if missing; it must hold no job yet): every post, input
    /// line, activation and dead letter is committed there before it is acknowledged, so a
    /// killed run loses nothing and `--resume` continues it.
    #[arg(long, value_name = "DIR")]
    durable: Option<PathBuf>,
    /// Continue the interrupted job in the --durable DIR: its queued items run again, and each
    /// --input file goes on from the line it reached. Give the same flow and input as the job
    /// it continues (a changed flow file, plugin or input file is refused).
    #[arg(long, requires = "durable")]
    resume: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    file::parse_duration(s)
}

/// The WebAssembly engine every command uses (default config: the on-disk cache in
/// `$ROUTILUX_CACHE_DIR` or the user's cache directory); says why when it cannot start.
fn engine() -> Option<crate::wasm::WasmEngine> {
    crate::wasm::WasmEngine::new(crate::wasm::WasmConfig::default())
        .map_err(|e| errln!("error: cannot start the WebAssembly engine: {e}"))
        .ok()
}

/// Prints diagnostics to stderr, then a count of errors.
fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        errln!("{d}\n");
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        errln!("{errors} error{} found", if errors == 1 { "" } else { "s" });
    }
}

/// Runs the tool with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    install_logging(cli.log_level);
    let code = match cli.command {
        Command::Run(a) => run::run(run::RunArgs {
            flow: a.flow,
            plugins: a.plugins.into(),
            posts: a.posts,
            inputs: a.inputs,
            threads: a.threads.map(usize::from),
            timeout: a.timeout,
            json: a.json,
            quiet: a.quiet,
            raw: a.raw,
            dead_letters: a.dead_letters,
            durable: a.durable,
            resume: a.resume,
        }),
        Command::Serve {
            action:
                Some(ServeAction::Token {
                    data_dir,
                    hash_only,
                }),
            ..
        } => serve::token(data_dir, hash_only),
        Command::Serve {
            action:
                Some(ServeAction::Purge {
                    tenant,
                    config,
                    data_dir,
                    yes,
                }),
            ..
        } => serve::purge(&tenant, config, data_dir, yes),
        Command::Serve {
            action: None,
            config,
            listen,
            data_dir,
        } => serve::serve(serve::ServeArgs {
            config,
            listen,
            data_dir,
        }),
        Command::Deploy {
            flow,
            plugins,
            remote,
        } => client::deploy(&remote.into(), &flow, &plugins.into()),
        Command::Post {
            flow,
            job,
            to,
            posts,
            inputs,
            keep_open,
            follow,
            remote,
        } => client::post(
            &remote.into(),
            client::PostArgs {
                flow,
                job,
                to,
                posts,
                inputs,
                keep_open,
                follow,
            },
        ),
        Command::Jobs { id, follow, remote } => client::jobs(&remote.into(), id.as_deref(), follow),
        Command::Validate { flow, plugins } => validate(flow, plugins.into()),
        Command::Job { dir, json } => durable::show(&dir, json),
        Command::Inspect { path, json } => inspect::inspect(&path, json),
        Command::New {
            name,
            lang,
            style,
            dir,
            sdk,
        } => new::new(&name, lang, style, dir.as_deref(), sdk.as_deref()),
        Command::Build { dir, js_engine } => match plugins::build_project(&dir, js_engine, false) {
            Ok(out) => {
                errln!("components in {}", out.display());
                Code::Ok
            }
            Err(e) => {
                errln!("error: {e}");
                Code::Failed
            }
        },
    };
    ExitCode::from(code as u8)
}

/// Per routine that requests or is granted anything: what it requested and what it got.
fn grant_lines(grants: &[load::RoutineGrants]) -> Vec<String> {
    let none = crate::wasm::Permissions::default();
    grants
        .iter()
        .filter(|g| g.requested != none || g.granted != none)
        .map(|g| {
            term::escape(&format!(
                "routine `{}`: requests {}; granted {}",
                g.routine,
                grants::describe(&g.requested),
                grants::describe(&g.granted)
            ))
            .into_owned()
        })
        .collect()
}

fn validate(flow: PathBuf, options: PluginOptions) -> Code {
    let Some(engine) = engine() else {
        return Code::Failed;
    };
    match load::load(&flow, &engine, &options) {
        Ok(l) => {
            print_diagnostics(&l.warnings);
            let n = l.flow.routines().count();
            let c = l.flow.connections().len();
            outln!(
                "{}: flow `{}` is valid ({n} routine{}, {c} connection{}){}",
                flow.display(),
                l.flow_id,
                if n == 1 { "" } else { "s" },
                if c == 1 { "" } else { "s" },
                l.description
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
            let entries: Vec<String> = l.entries.iter().map(|(r, s)| format!("{r}.{s}")).collect();
            if !entries.is_empty() {
                outln!("entry slots: {}", entries.join(", "));
            }
            for line in grant_lines(&l.grants) {
                outln!("{line}");
            }
            Code::Ok
        }
        Err(diags) => {
            print_diagnostics(&diags);
            Code::Invalid
        }
    }
}
