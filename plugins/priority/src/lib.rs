//! The reference page's conditional fan-out ("Conditional Fan-Out" of
//! `docs/reference/fan-out.rst`): a router sends each item to the event its priority selects;
//! each processor's `level` comes from its config, set per routine by the flow.

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json, python_repr};

/// Routes each item by its `priority` (a number; absent counts as 0): 8 and up to
/// `high_priority`, 5 and up to `normal_priority`, the rest to `low_priority`, each sent as
/// `{"data": item}` and printed as the page prints it (`Router: High priority → {'id': 1, ...}`).
pub struct Router;

impl Routine for Router {
    const NAME: &'static str = "router";
    fn spec() -> Spec {
        Spec::new("routes each item to high, normal or low priority by its `priority`")
            .slot("input")
            .event("high_priority", ["data"])
            .event("normal_priority", ["data"])
            .event("low_priority", ["data"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        for item in batch.slot("input") {
            let priority = match item.value().get("priority") {
                None | Some(serde_json::Value::Null) => 0.0,
                Some(p) => p
                    .as_f64()
                    .ok_or_else(|| Error::fatal(format!("`priority` must be a number, not {p}")))?,
            };
            let (event, label) = if priority >= 8.0 {
                ("high_priority", "High")
            } else if priority >= 5.0 {
                ("normal_priority", "Normal")
            } else {
                ("low_priority", "Low")
            };
            println!("Router: {label} priority → {}", python_repr(item.value()));
            ctx.emit(event, &json!({ "data": item.value() }))?;
        }
        Ok(())
    }
}

/// Prints `  [LEVEL] Processing: ITEM` for each item it gets (the routed item, as the page's
/// expected output shows it, in Python's dict form).
pub struct Processor;

impl Routine for Processor {
    const NAME: &'static str = "processor";
    fn spec() -> Spec {
        Spec::new("processes items at the level set in its config")
            .slot("data")
            .config("level", "")
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let level: String = ctx.config("level")?.unwrap_or_default();
        for item in batch.slot("data") {
            // The router sends `{"data": item}`; the page prints the item itself.
            let routed = item.value().get("data").unwrap_or(item.value());
            println!("  [{level}] Processing: {}", python_repr(routed));
        }
        Ok(())
    }
}

routilux_sdk::export!(Router, Processor);
