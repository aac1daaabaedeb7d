//! The reference page's news fan-out ("Basic Fan-Out Example" of `docs/reference/fan-out.rst`):
//! a broadcaster publishes headlines, each with the time it was sent; email, SMS and log
//! subscribers each print every headline the way the page's subscribers do.

use std::time::{Duration, SystemTime};

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json};

/// The page's headlines, published when a trigger names none.
const HEADLINES: [&str; 3] = [
    "Breaking: Python 4.0 Released!",
    "News: Routilux Documentation Complete",
    "Update: Async Support Improved",
];

/// Publishes headlines on `news` with an ISO timestamp, printing `Broadcasting: HEADLINE` and
/// pausing `delay_ms` after each (the page's 0.1 s). A trigger may name its own headlines
/// (`{"headlines": [..]}` or `{"headline": ".."}`); an empty trigger publishes the config's.
pub struct Broadcaster;

impl Routine for Broadcaster {
    const NAME: &'static str = "broadcaster";
    fn spec() -> Spec {
        Spec::new("publishes headlines on `news`, each with its timestamp")
            .slot("trigger")
            .event("news", ["headline", "timestamp"])
            .config("headlines", json!(HEADLINES))
            .config("delay_ms", 100)
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let delay = Duration::from_millis(ctx.config("delay_ms")?.unwrap_or(100));
        let defaults: Vec<String> = ctx.config("headlines")?.unwrap_or_default();
        for trigger in batch.slot("trigger") {
            let many: Option<Vec<String>> = trigger.get_opt("headlines")?;
            let one: Option<String> = trigger.get_opt("headline")?;
            let headlines = match (many, one) {
                (None, None) => defaults.clone(),
                (many, one) => many.into_iter().flatten().chain(one).collect(),
            };
            for headline in headlines {
                println!("Broadcasting: {headline}");
                ctx.emit(
                    "news",
                    &json!({ "headline": headline, "timestamp": timestamp() }),
                )?;
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
            }
        }
        Ok(())
    }
}

/// Now, as Python's `datetime.now().isoformat()` prints it (`2024-01-01T10:00:00.123456`); a
/// sandbox has no time zone, so it is UTC.
fn timestamp() -> String {
    let text = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    text.trim_end_matches('Z').to_string()
}

/// The subscriber's name from its config (`subscriber_name`, as the page sets it).
fn name(ctx: &Context) -> Result<String, Error> {
    Ok(ctx.config("subscriber_name")?.unwrap_or_default())
}

/// Prints `  [NAME] Would send email: HEADLINE` for each headline.
pub struct Email;

impl Routine for Email {
    const NAME: &'static str = "email";
    fn spec() -> Spec {
        Spec::new("would send each headline by email")
            .slot("news")
            .config("subscriber_name", "Email Service")
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let name = name(ctx)?;
        for item in batch.slot("news") {
            let headline: String = item.get("headline")?;
            println!("  [{name}] Would send email: {headline}");
        }
        Ok(())
    }
}

/// Prints `  [NAME] Would send SMS: ...` with the headline cut to 50 characters, as the page does.
pub struct Sms;

impl Routine for Sms {
    const NAME: &'static str = "sms";
    fn spec() -> Spec {
        Spec::new("would send each headline, cut to 50 characters, by SMS")
            .slot("news")
            .config("subscriber_name", "SMS Service")
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let name = name(ctx)?;
        for item in batch.slot("news") {
            let headline: String = item.get("headline")?;
            // Python's `headline[:50]`: the first 50 characters (code points), not bytes.
            let short: String = headline.chars().take(50).collect();
            println!("  [{name}] Would send SMS: {short}...");
        }
        Ok(())
    }
}

/// Prints `  [NAME] Logged: TIMESTAMP - HEADLINE` for each headline.
pub struct Log;

impl Routine for Log {
    const NAME: &'static str = "log";
    fn spec() -> Spec {
        Spec::new("logs each headline with its timestamp")
            .slot("news")
            .config("subscriber_name", "Log Service")
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let name = name(ctx)?;
        for item in batch.slot("news") {
            let headline: String = item.get("headline")?;
            let timestamp: String = item.get_opt("timestamp")?.unwrap_or_default();
            println!("  [{name}] Logged: {timestamp} - {headline}");
        }
        Ok(())
    }
}

/// Emits each item it is given on `out`, unchanged (the same kind as the Python, JavaScript
/// and C plugins' `echo`; the benchmarks compare them).
pub struct Echo;

impl Routine for Echo {
    const NAME: &'static str = "echo";
    fn spec() -> Spec {
        Spec::new("Emits each item it is given on `out`, unchanged.")
            .slot("in")
            .event("out", [] as [&str; 0])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        for item in batch.slot("in") {
            ctx.emit_item("out", item)?;
        }
        Ok(())
    }
}

routilux_sdk::export!(Broadcaster, Email, Sms, Log, Echo);
