//! The one `bindgen!` of the host, over the top-level `wit/` package.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    // Parameters of calls into guests borrow their strings and lists (no per-item copy).
    ownership: Borrowing {
        duplicate_if_necessary: true
    },
});

pub(crate) use self::exports::routilux::plugin::routine::{
    ActivationError, RoutineKind, SlotBatch,
};
pub(crate) use self::routilux::plugin::host::Host;
pub(crate) use self::routilux::plugin::types::Level;
