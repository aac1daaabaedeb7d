//! A hostile guest, for the sandbox's tests: one routine kind, `hostile`, that does to the
//! host whatever each item asks, at the size and count it asks. Every way a guest can hand
//! the host memory, time or text is here, so a test can show each budget holding:
//!
//! | `do` | what it does |
//! | --- | --- |
//! | `emit` | emits `count` items of `bytes` bytes each on `out` |
//! | `print` | prints `count` lines of `bytes` bytes (or `text` as given) |
//! | `log` | logs `count` messages of `bytes` bytes |
//! | `state` | sets `count` WorkerState keys to values of `bytes` bytes (`shape`: `string`, or `zeros` for `[0,0,…]`) |
//! | `fail` | fails with a message of `bytes` bytes |
//! | `sleep` | sleeps `ms` milliseconds in `std::thread::sleep` (a blocking `pollable.block`) |
//! | `poll` | waits `ms` milliseconds in `wasi:io/poll.poll` on two clocks |
//! | `grow` | allocates `bytes` bytes and keeps them for the instance's life |
//! | `random` | asks WASI for `bytes` random bytes |
//! | `resources` | makes `count` pollables and never drops them |
//! | `double` | emits the item twice, one generation on (a flood in a cycle) |
//! | `count` | prints how many `count` items this instance has seen (what its memory carries) |
//! | `calls` | makes the raw host calls listed in `calls` (`{"f": "emit" / "log" / "config" / "state_get" / "state_set" / "state_add" / "cas" / "job_id", "a": …, "b": …, "c": …, "n": …}`) with whatever arguments they hold, ignoring the results (for the fuzzer) |
//! | `fault` | emits `emits` items `{"n": i}`, failing before the one numbered `at` (at the end if `at >= emits`) with a `kind` of fault: `error` (retryable), `trap` (a panic), `deadline` (a busy loop), `budget` (an emit of `bytes` bytes), or none for any other kind |
//! | `flaky` | emits the item's `id` on `out`, adds 1 to WorkerState `n`, and fails (retryably) the first `fails` times it sees that id |
//! | anything else | forwards the item |

use std::sync::Mutex;

use routilux_sdk::{Batch, Context, Error, Level, Routine, Spec, json};

/// What `grow` keeps alive.
static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// How many times `flaky` has seen each id (the instance lives on after an error value).
static FLAKY: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// Fails as `kind` says.
fn fault(kind: &str, bytes: u64) -> Result<(), Error> {
    match kind {
        "trap" => panic!("fault: trap"),
        "deadline" => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "budget" => {
            raw::emit("out", &padded_item(bytes)).map_err(Error::fatal)?;
            Ok(())
        }
        "error" => Err(Error::retryable("fault: error")),
        _ => Ok(()),
    }
}

/// What `count` counts: guest memory that lives as long as the instance.
static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `bytes` bytes of text.
fn pad(bytes: u64) -> String {
    "x".repeat(bytes as usize)
}

/// `{"pad":"xxx…"}` of about `bytes` bytes, made in one buffer (a guest hands the host huge
/// values without needing three times their size itself).
fn padded_item(bytes: u64) -> String {
    let mut t = String::with_capacity(bytes as usize + 16);
    t.push_str("{\"pad\":\"");
    t.extend(std::iter::repeat_n('x', bytes as usize));
    t.push_str("\"}");
    t
}

use routilux_sdk::bindings::routilux::plugin::host as raw;

/// The hostile routine.
pub struct Hostile;

impl Routine for Hostile {
    const NAME: &'static str = "hostile";
    fn spec() -> Spec {
        Spec::new("does to the host whatever each item asks (a test fixture)")
            .slot("in")
            .event("out", ["pad", "gen"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        for item in batch.items() {
            let what: String = item.get_opt("do")?.unwrap_or_default();
            let bytes: u64 = item.get_opt("bytes")?.unwrap_or(0);
            let count: u64 = item.get_opt("count")?.unwrap_or(1);
            let ms: u64 = item.get_opt("ms")?.unwrap_or(0);
            match what.as_str() {
                "emit" => {
                    let text = padded_item(bytes);
                    for _ in 0..count {
                        raw::emit("out", &text).map_err(Error::fatal)?;
                    }
                }
                "print" => {
                    let text: Option<String> = item.get_opt("text")?;
                    let line = text.unwrap_or_else(|| pad(bytes));
                    for _ in 0..count {
                        println!("{line}");
                    }
                }
                "log" => {
                    let text = pad(bytes);
                    for _ in 0..count {
                        ctx.log(Level::Info, &text);
                    }
                }
                "state" => {
                    let shape: String = item.get_opt("shape")?.unwrap_or_default();
                    let mut value = String::with_capacity(bytes as usize + 2);
                    if shape == "zeros" {
                        value.push('[');
                        while (value.len() as u64) + 2 < bytes {
                            value.push_str("0,");
                        }
                        value.push_str("0]");
                    } else {
                        value.push('"');
                        value.extend(std::iter::repeat_n('x', bytes.saturating_sub(2) as usize));
                        value.push('"');
                    }
                    for i in 0..count {
                        raw::state_set(&format!("k{i}"), &value).map_err(Error::fatal)?;
                    }
                }
                "fail" => return Err(Error::fatal(pad(bytes))),
                "sleep" => std::thread::sleep(std::time::Duration::from_millis(ms)),
                "poll" => {
                    use wasip2::clocks::monotonic_clock::subscribe_duration;
                    let a = subscribe_duration(ms * 1_000_000);
                    let b = subscribe_duration(ms * 2_000_000);
                    let _ = wasip2::io::poll::poll(&[&a, &b]);
                }
                "grow" => {
                    let block = vec![7u8; bytes as usize];
                    std::hint::black_box(&block);
                    HOARD
                        .lock()
                        .map_err(|_| Error::fatal("poisoned"))?
                        .push(block);
                }
                "random" => {
                    let got = wasip2::random::random::get_random_bytes(bytes);
                    println!("random {}", got.len());
                }
                "resources" => {
                    use wasip2::clocks::monotonic_clock::subscribe_duration;
                    for _ in 0..count {
                        std::mem::forget(subscribe_duration(1_000_000_000));
                    }
                }
                "double" => {
                    let generation: u64 = item.get_opt("gen")?.unwrap_or(0);
                    let next = json!({ "do": "double", "gen": generation + 1, "pad": pad(bytes), "bytes": bytes });
                    ctx.emit("out", &next)?;
                    ctx.emit("out", &next)?;
                }
                "fault" => {
                    let emits: u64 = item.get_opt("emits")?.unwrap_or(2);
                    let at: u64 = item.get_opt("at")?.unwrap_or(0);
                    let kind: String = item.get_opt("kind")?.unwrap_or_default();
                    for n in 0..emits {
                        if n == at {
                            fault(&kind, bytes)?;
                        }
                        ctx.emit("out", &json!({ "n": n }))?;
                    }
                    if at >= emits {
                        fault(&kind, bytes)?;
                    }
                }
                "flaky" => {
                    let id: u64 = item.get_opt("id")?.unwrap_or(0);
                    let fails: u64 = item.get_opt("fails")?.unwrap_or(1);
                    ctx.emit("out", &json!({ "id": id }))?;
                    ctx.add_state("n", 1)?;
                    let seen = {
                        let mut f = FLAKY.lock().map_err(|_| Error::fatal("poisoned"))?;
                        match f.iter_mut().find(|(k, _)| *k == id) {
                            Some((_, n)) => {
                                *n += 1;
                                *n
                            }
                            None => {
                                f.push((id, 1));
                                1
                            }
                        }
                    };
                    if seen <= fails {
                        return Err(Error::retryable(format!(
                            "flaky: attempt {seen} of id {id}"
                        )));
                    }
                }
                "calls" => {
                    let calls: Vec<serde_json::Value> = item.get_opt("calls")?.unwrap_or_default();
                    for c in calls {
                        let arg = |k: &str| c[k].as_str().unwrap_or("").to_owned();
                        let (a, b) = (arg("a"), arg("b"));
                        match c["f"].as_str().unwrap_or("") {
                            "emit" => drop(raw::emit(&a, &b)),
                            "log" => {
                                use routilux_sdk::bindings::routilux::plugin::types::Level as L;
                                let level = match c["n"].as_i64().unwrap_or(0).rem_euclid(5) {
                                    0 => L::Trace,
                                    1 => L::Debug,
                                    2 => L::Info,
                                    3 => L::Warn,
                                    _ => L::Error,
                                };
                                raw::log(level, &a);
                            }
                            "config" => drop(raw::config(&a)),
                            "state_get" => drop(raw::state_get(&a)),
                            "state_set" => drop(raw::state_set(&a, &b)),
                            "state_add" => drop(raw::state_add(&a, c["n"].as_i64().unwrap_or(0))),
                            "cas" => {
                                let expected = c["c"].as_str().map(str::to_owned);
                                drop(raw::state_compare_and_swap(&a, expected.as_deref(), &b));
                            }
                            "job_id" => drop(raw::job_id()),
                            _ => {}
                        }
                    }
                }
                "count" => {
                    let n = SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    println!("count {n}");
                }
                _ => ctx.emit_item("out", item)?,
            }
        }
        Ok(())
    }
}

routilux_sdk::export!(Hostile);
