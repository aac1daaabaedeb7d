//! Flow files and manifests from arbitrary text: parsing never panics (serde-saphyr's
//! budgets bound aliases and depth), and every diagnostic — at a parse error's place or at
//! any parsed value's — renders without a panic, whatever the line, column and characters.
#![no_main]

#[allow(dead_code)]
#[path = "../../host/src/cli/diag.rs"]
mod diag;
#[allow(dead_code, unused_imports)]
#[path = "../../host/src/cli/file.rs"]
mod file;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let src = diag::Source::from_text(Path::new("fuzz.yaml"), text.to_owned());
    match src.parse::<file::FlowFile>() {
        Ok(flow) => {
            let _ = src.error(&flow.flow_id.referenced, "at the flow id").to_string();
            for (id, r) in &flow.routines {
                let _ = src.warning(&id.referenced, "at a routine").to_string();
                let _ = src.error(&r.value.kind.referenced, "at its kind").to_string();
            }
            for c in &flow.connections {
                let _ = src.error(&c.value.from.referenced, "at a connection").to_string();
            }
        }
        Err(d) => {
            let _ = d.to_string();
        }
    }
    if let Err(d) = src.parse::<file::ManifestFile>() {
        let _ = d.to_string();
    }
});
