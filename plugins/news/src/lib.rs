//! The reference page's news fan-out: a broadcaster publishes headlines; email, SMS and log
//! subscribers each print every headline.

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json};

/// Publishes the headlines of each trigger (`{"headlines": [..]}` or `{"headline": ".."}`).
pub struct Broadcaster;

impl Routine for Broadcaster {
    const NAME: &'static str = "broadcaster";
    fn spec() -> Spec {
        Spec::new("publishes each headline it is given on `news`")
            .slot("trigger")
            .event("news", ["headline"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        for trigger in batch.slot("trigger") {
            let many: Option<Vec<String>> = trigger.get_opt("headlines")?;
            let one: Option<String> = trigger.get_opt("headline")?;
            for headline in many.into_iter().flatten().chain(one) {
                ctx.emit("news", &json!({ "headline": headline }))?;
            }
        }
        Ok(())
    }
}

macro_rules! subscriber {
    ($ty:ident, $name:literal, $label:literal) => {
        #[doc = concat!("Prints each headline as `[", $label, "] headline`.")]
        pub struct $ty;

        impl Routine for $ty {
            const NAME: &'static str = $name;
            fn spec() -> Spec {
                Spec::new(concat!("delivers each headline by ", $name)).slot("news")
            }
            fn activate(_ctx: &Context, batch: &Batch) -> Result<(), Error> {
                for item in batch.slot("news") {
                    let headline: String = item.get("headline")?;
                    println!("[{}] {headline}", $label);
                }
                Ok(())
            }
        }
    };
}

subscriber!(Email, "email", "EMAIL");
subscriber!(Sms, "sms", "SMS");
subscriber!(Log, "log", "LOG");

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
