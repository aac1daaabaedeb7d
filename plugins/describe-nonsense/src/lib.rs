//! A plugin whose `describe` returns nonsense: the same kind twice, a repeated slot, a slot
//! that holds nothing, a default config that is not a JSON object, and names that would
//! reach a terminal as escape sequences or break `routine.slot` (a name with a dot).

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
        let mut hostile = kind("{}");
        hostile.name = "\x1b[2Jclear".into();
        hostile.slots.truncate(1);
        hostile.slots[0].name = "a.b".into();
        hostile.events[0].fields = vec!["line\nbreak".into()];
        vec![kind("{}"), kind("[1, 2]"), hostile]
    }
    fn activate(_: String, _: Vec<SlotBatch>, _: Option<String>) -> Result<(), ActivationError> {
        Ok(())
    }
}

routilux_sdk::bindings::export_plugin!(Nonsense with_types_in routilux_sdk::bindings);
