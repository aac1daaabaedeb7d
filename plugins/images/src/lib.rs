//! The reference page's parallel image processing ("Parallel Processing Pattern" of
//! `docs/reference/fan-out.rst`): a producer sends images; resize, filter and compress each
//! process every image, at the same time as each other (each in its own instance).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use routilux_sdk::{Batch, Context, Error, Level, Routine, Spec, json};

/// Sends `count` images per trigger (config, or the trigger's `count`), printing `Producer:
/// Sending image N` and pausing `delay_ms` after each (the page's 3 images, 0.1 s apart).
pub struct Producer;

impl Routine for Producer {
    const NAME: &'static str = "producer";
    fn spec() -> Spec {
        Spec::new("sends `count` images per trigger")
            .slot("trigger")
            .event("image", ["id", "data"])
            .config("count", 3)
            .config("delay_ms", 100)
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let default_count: u32 = ctx.config("count")?.unwrap_or(3);
        let delay = Duration::from_millis(ctx.config("delay_ms")?.unwrap_or(100));
        for trigger in batch.slot("trigger") {
            let count: u32 = trigger.get_opt("count")?.unwrap_or(default_count);
            for i in 0..count {
                println!("Producer: Sending image {i}");
                ctx.emit(
                    "image",
                    &json!({ "id": i, "data": format!("image_{i}_bytes") }),
                )?;
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
            }
        }
        Ok(())
    }
}

/// Microseconds since the Unix epoch.
fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

macro_rules! processor {
    ($ty:ident, $name:literal, $label:literal, $event:literal, $field:literal, $value:literal, $ms:literal) => {
        #[doc = concat!(
            "Spends `work_ms` (config; the page's ", $ms, " ms) on each image, prints `  [",
            $label, "] Processed image N` and emits `", $event, "` with `", $field, "`."
        )]
        pub struct $ty;

        impl Routine for $ty {
            const NAME: &'static str = $name;
            fn spec() -> Spec {
                Spec::new(concat!("processes each image (", $ms, " ms of simulated work)"))
                    .slot("image")
                    .event($event, ["id", $field])
                    .config("work_ms", $ms)
                    .config("report_times", false)
            }
            fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
                let work = Duration::from_millis(ctx.config("work_ms")?.unwrap_or($ms));
                let report: bool = ctx.config("report_times")?.unwrap_or(false);
                for image in batch.slot("image") {
                    let id: u64 = image.get("id")?;
                    let started = now_us();
                    std::thread::sleep(work);
                    println!("  [{}] Processed image {id}", $label);
                    if report {
                        // The routine's own start and end (µs since the epoch): how a test
                        // sees the processors overlap without timing the whole run.
                        ctx.log(Level::Info, format!("image {id} {started} {}", now_us()));
                    }
                    ctx.emit($event, &json!({ "id": id, $field: $value }))?;
                }
                Ok(())
            }
        }
    };
}

processor!(
    Resize, "resize", "Resize", "resized", "size", "800x600", 200
);
processor!(
    Filter,
    "filter",
    "Filter",
    "filtered",
    "filter",
    "grayscale",
    150
);
processor!(
    Compress,
    "compress",
    "Compress",
    "compressed",
    "ratio",
    "0.8",
    250
);

routilux_sdk::export!(Producer, Resize, Filter, Compress);
