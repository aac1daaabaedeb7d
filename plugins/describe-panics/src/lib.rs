//! A plugin whose `describe` traps: the host must refuse it with a clear error.

use routilux_sdk::bindings::exports::routilux::plugin::routine::{
    ActivationError, Guest, RoutineKind, SlotBatch,
};

struct Broken;

impl Guest for Broken {
    fn describe() -> Vec<RoutineKind> {
        panic!("describe is broken on purpose");
    }
    fn activate(_: String, _: Vec<SlotBatch>, _: Option<String>) -> Result<(), ActivationError> {
        Ok(())
    }
}

routilux_sdk::bindings::export_plugin!(Broken with_types_in routilux_sdk::bindings);
