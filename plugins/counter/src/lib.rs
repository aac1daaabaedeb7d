//! A WorkerState counter: counts the items it sees in a job, in host-owned state.

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json};

/// Adds the number of items of each activation to WorkerState `count` and emits the total.
pub struct Counter;

impl Routine for Counter {
    const NAME: &'static str = "counter";
    fn spec() -> Spec {
        Spec::new("counts items in WorkerState and emits the running total")
            .slot("in")
            .event("count", ["count"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let count = ctx.add_state("count", batch.len() as i64)?;
        ctx.emit("count", &json!({ "count": count }))
    }
}

routilux_sdk::export!(Counter);
