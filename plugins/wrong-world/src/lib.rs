//! A component of another version of the WIT package (`routilux:plugin@0.9.0`, with a
//! different `describe`): the host must refuse it, naming the mismatch.

wit_bindgen::generate!({
    inline: r#"
        package routilux:plugin@0.9.0;
        interface routine {
            describe: func() -> string;
        }
        world plugin {
            export routine;
        }
    "#,
    world: "plugin",
});

struct Other;

impl exports::routilux::plugin::routine::Guest for Other {
    fn describe() -> String {
        "I am from the future".into()
    }
}

export!(Other);
