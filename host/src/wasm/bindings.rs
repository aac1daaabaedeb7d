//! The one `bindgen!` of the host, over the top-level `wit/` package.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});

pub(crate) use self::exports::routilux::plugin::routine::{
    ActivationError, RoutineKind, SlotBatch,
};
pub(crate) use self::routilux::plugin::host::Host;
pub(crate) use self::routilux::plugin::types::Level;
