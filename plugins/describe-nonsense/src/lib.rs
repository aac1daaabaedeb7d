//! A plugin whose `describe` returns nonsense: the same kind twice, a repeated slot, a slot
//! that holds nothing, a default config that is not a JSON object, and names that would
//! reach a terminal as escape sequences or break `routine.slot` (a name with a dot), and
//! default policies that are none.

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
        default_policy: None,
    }
}

impl Guest for Nonsense {
    fn describe() -> Vec<RoutineKind> {
        let mut hostile = kind("{}");
        hostile.name = "\x1b[2Jclear".into();
        hostile.slots.truncate(1);
        hostile.slots[0].name = "a.b".into();
        hostile.events[0].fields = vec!["line\nbreak".into()];
        // Default policies a guest cannot have: not a policy, a batch of none, a custom one.
        let mut p1 = kind("{}");
        p1.name = "p1".into();
        p1.slots.truncate(1);
        p1.default_policy = Some(r#"{"batch_size": 0}"#.into());
        let mut p2 = p1.clone();
        p2.name = "p2".into();
        p2.default_policy = Some(r#"{"custom": "mine"}"#.into());
        let mut p3 = p1.clone();
        p3.name = "p3".into();
        p3.default_policy = Some(r#"{"time_interval": "soon"}"#.into());
        vec![kind("{}"), kind("[1, 2]"), hostile, p1, p2, p3]
    }
    fn activate(_: String, _: Vec<SlotBatch>, _: Option<String>) -> Result<(), ActivationError> {
        Ok(())
    }
}

routilux_sdk::bindings::export_plugin!(Nonsense with_types_in routilux_sdk::bindings);
