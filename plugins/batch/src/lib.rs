//! A batch processor: sums the `value` field of each batch it gets (use it with `batch_size`).

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json};

/// Emits `{"count", "sum", "policy"}` for each activation's batch.
pub struct BatchProcessor;

impl Routine for BatchProcessor {
    const NAME: &'static str = "batch_processor";
    fn spec() -> Spec {
        Spec::new("sums the `value` of the items of each batch")
            .slot("in")
            .event("summary", ["count", "sum", "policy"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let mut sum = 0.0;
        for item in batch.slot("in") {
            sum += item.get_opt::<f64>("value")?.unwrap_or(0.0);
        }
        println!("batch of {} items, sum {sum}", batch.len());
        ctx.emit(
            "summary",
            &json!({ "count": batch.len(), "sum": sum, "policy": batch.message() }),
        )
    }
}

routilux_sdk::export!(BatchProcessor);
