//! Items from arbitrary bytes: never a panic; whatever is accepted is a JSON object whose
//! value reads back, whose size is its text's, and which survives a round trip through its
//! own serialisation.
#![no_main]

#[allow(dead_code)]
#[path = "../../host/src/model/item.rs"]
mod item;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(it) = item::Item::from_json_bytes(data.to_vec()) else {
        return;
    };
    assert!(it.value().is_object());
    assert_eq!(it.byte_len(), it.json_str().len());
    let compact = serde_json::to_string(it.value()).expect("a value serialises");
    let again = item::Item::from_json_text(compact).expect("its own text is an item");
    assert_eq!(again.value(), it.value());
    let made = item::Item::new(it.value().clone()).expect("an object");
    assert_eq!(made.byte_len(), made.json_str().len());
});
