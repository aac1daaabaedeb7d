//! The reference page's priority routing: a router sends each task to the event of its
//! priority; a processor's `level` comes from its config.

use routilux_sdk::{Batch, Context, Error, Routine, Spec};

/// Routes each task (`{"id", "priority": "high"|"normal"|"low"}`) to the event of its priority.
pub struct Router;

impl Routine for Router {
    const NAME: &'static str = "router";
    fn spec() -> Spec {
        Spec::new("routes each task to `high`, `normal` or `low` by its priority")
            .slot("task")
            .event("high", ["id", "priority"])
            .event("normal", ["id", "priority"])
            .event("low", ["id", "priority"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        for task in batch.slot("task") {
            let priority: String = task.get_opt("priority")?.unwrap_or_else(|| "normal".into());
            let event = match priority.as_str() {
                "high" | "low" => priority.as_str(),
                _ => "normal",
            };
            ctx.emit(event, task.value())?;
        }
        Ok(())
    }
}

/// Processes tasks at the `level` of its config, printing `[LEVEL] processing task <id>`.
pub struct Processor;

impl Routine for Processor {
    const NAME: &'static str = "processor";
    fn spec() -> Spec {
        Spec::new("processes tasks at the priority level set in its config")
            .slot("task")
            .event("processed", ["id", "level"])
            .config("level", "normal")
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let level: String = ctx.config("level")?.unwrap_or_else(|| "normal".into());
        for task in batch.slot("task") {
            let id: serde_json::Value = task.get("id")?;
            println!("[{}] processing task {id}", level.to_uppercase());
            ctx.emit(
                "processed",
                &serde_json::json!({ "id": id, "level": level }),
            )?;
        }
        Ok(())
    }
}

routilux_sdk::export!(Router, Processor);
