//! Loading: self-description, several kinds per component, the compiled-component cache, and
//! clear errors for files that are not usable plugins.

use std::path::PathBuf;

use routilux::wasm::{LoadError, WasmConfig, WasmEngine};

use super::{engine, load};
use crate::plugins::plugin;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("routilux-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_component_describes_its_kinds() {
    let news = load("news");
    assert_eq!(
        news.kind_names(),
        vec!["broadcaster", "email", "sms", "log", "echo"]
    );
    let b = news.kind("broadcaster").unwrap();
    assert_eq!(b.slots[0].name.as_ref(), "trigger");
    assert_eq!(b.events[0].name.as_ref(), "news");
    assert_eq!(
        b.events[0].fields,
        vec!["headline".to_owned(), "timestamp".to_owned()]
    );
    assert!(b.description.contains("headline"));
    let images = load("images");
    let resize = images.kind("resize").unwrap();
    assert_eq!(resize.default_config["work_ms"], 200);
    assert!(
        news.imports()
            .iter()
            .any(|i| i == "routilux:plugin/host@0.4.0"),
        "{:?}",
        news.imports()
    );
}

#[test]
fn a_second_load_comes_from_the_cache_without_compiling() {
    let dir = temp_dir("cache");
    let config = || WasmConfig {
        cache_dir: Some(dir.clone()),
        ..WasmConfig::default()
    };
    let first = WasmEngine::new(config()).unwrap();
    let p = first.load(plugin("counter")).unwrap();
    assert!(!p.from_cache());
    assert_eq!((first.stats().compiled, first.stats().cache_hits), (1, 0));
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "one compiled component in the cache");

    let second = WasmEngine::new(config()).unwrap();
    let p = second.load(plugin("counter")).unwrap();
    assert!(p.from_cache());
    assert_eq!((second.stats().compiled, second.stats().cache_hits), (0, 1));
    assert_eq!(p.kind_names(), vec!["counter"]);

    // A corrupt entry is not trusted: it is replaced by a fresh compile.
    for e in std::fs::read_dir(&dir).unwrap() {
        std::fs::write(e.unwrap().path(), b"garbage").unwrap();
    }
    let third = WasmEngine::new(config()).unwrap();
    let p = third.load(plugin("counter")).unwrap();
    assert!(!p.from_cache());
    assert_eq!(third.stats().compiled, 1);
}

#[test]
fn files_that_are_not_plugins_are_refused_with_a_clear_error() {
    let dir = temp_dir("bad-files");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let e = engine().load(&text).unwrap_err();
    assert!(matches!(e, LoadError::NotWasm { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: not a WebAssembly file (no `\\0asm` header)",
            text.display()
        )
    );

    let core = dir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let e = engine().load(&core).unwrap_err();
    assert!(matches!(e, LoadError::CoreModule { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("core WebAssembly module, not a component"),
        "{e}"
    );

    let missing = dir.join("missing.wasm");
    let e = engine().load(&missing).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", missing.display())),
        "{e}"
    );

    let truncated = dir.join("truncated.wasm");
    let bytes = std::fs::read(plugin("counter")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = engine().load(&truncated).unwrap_err();
    assert!(matches!(e, LoadError::Compile { .. }), "{e}");
    assert!(e.to_string().contains("truncated.wasm"), "{e}");
}

#[test]
fn a_component_of_another_world_or_version_is_refused() {
    let e = engine().load(plugin("wrong_world")).unwrap_err();
    assert!(matches!(e, LoadError::WrongWorld { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("wrong_world.wasm"), "{text}");
    assert!(
        text.contains("not a routilux:plugin@0.4.0 (or 0.3.0) plugin"),
        "{text}"
    );
}

#[test]
fn a_describe_that_traps_or_talks_nonsense_is_refused() {
    let e = engine().load(plugin("describe_panics")).unwrap_err();
    assert!(matches!(e, LoadError::Describe { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("describe_panics.wasm: `describe` failed"),
        "{e}"
    );

    let e = engine().load(plugin("describe_nonsense")).unwrap_err();
    let LoadError::BadDescription { problems, .. } = &e else {
        panic!("expected BadDescription, got {e}");
    };
    let text = e.to_string();
    assert!(text.contains("kind `twice` is described twice"), "{text}");
    assert!(text.contains("slot name `in` is repeated"), "{text}");
    // Names are words: an escape sequence, a dot or a newline is refused, and the message
    // shows them escaped.
    assert!(
        text.contains(r"kind name `\x1b[2Jclear` holds `\u{1b}`"),
        "{text}"
    );
    assert!(text.contains("slot name `a.b` holds `.`"), "{text}");
    assert!(
        text.contains(r"field name `line\nbreak` holds `\n`"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.contains("slot `in` holds no item"), "{text}");
    assert!(
        text.contains("default config must be a JSON object"),
        "{text}"
    );
    assert!(
        text.contains("kind `p1`: default policy `{\"batch_size\": 0}` `batch_size` must be"),
        "{text}"
    );
    assert!(
        text.contains("kind `p2`: default policy `{\"custom\": \"mine\"}` is not a policy"),
        "{text}"
    );
    assert!(
        text.contains("kind `p3`: default policy `{\"time_interval\": \"soon\"}` `time_interval` `soon` is not a duration"),
        "{text}"
    );
    assert!(problems.len() >= 7, "{problems:?}");
}

#[test]
fn an_unknown_kind_is_named_with_a_suggestion() {
    let news = load("news");
    let e = news.routine("emial").unwrap_err();
    assert!(
        e.to_string().ends_with(
            "no routine kind `emial` (it provides: broadcaster, email, sms, log, echo) (did you mean `email`?)"
        ),
        "{e}"
    );
    let with_fuel = routilux::wasm::Limits {
        fuel: Some(1000),
        ..Default::default()
    };
    let e = news.routine_with("email", with_fuel).unwrap_err();
    assert!(
        e.to_string().contains("needs an engine with fuel metering"),
        "{e}"
    );
}
