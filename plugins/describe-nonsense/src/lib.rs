//! A plugin whose `describe` returns nonsense: the same kind twice, a repeated slot, a slot
//! that holds nothing, and a default config that is not a JSON object.

use routilux_sdk::bindings::exports::routilux::plugin::routine::{
    ActivationError, Guest, RoutineKind, SlotBatch,
};
use routilux_sdk::bindings::routilux::plugin::types::{EventSpec, SlotSpec};

struct Nonsense;

fn kind(config: &str) -> RoutineKind {
    RoutineKind {
        name: "twice".into(),
        description: "described twice".into(),
        slots: vec![
            SlotSpec {
                name: "in".into(),
                max_queue_length: None,
            },
            SlotSpec {
                name: "in".into(),
                max_queue_length: Some(0),
            },
        ],
        events: vec![EventSpec {
            name: "out".into(),
            fields: vec![],
        }],
        default_config: config.into(),
    }
}

impl Guest for Nonsense {
    fn describe() -> Vec<RoutineKind> {
        vec![kind("{}"), kind("[1, 2]")]
    }
    fn activate(_: String, _: Vec<SlotBatch>, _: Option<String>) -> Result<(), ActivationError> {
        Ok(())
    }
}

routilux_sdk::bindings::export_plugin!(Nonsense with_types_in routilux_sdk::bindings);
