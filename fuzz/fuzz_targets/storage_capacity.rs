//! CSIStorageCapacity objects published by other agents (any JSON the API server would hand over):
//! never a panic; a candidate only from an object of the asked class with a valid capacity.
#![no_main]
use hostvol::controller::context::published_candidate;
use hostvol::domain::quantity::parse_bytes;
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(object) = serde_json::from_slice::<DynamicObject>(data) else {
        return;
    };
    if let Some(c) = published_candidate(&object, "hostvol") {
        let published = object.data["capacity"].as_str().expect("capacity is a string");
        assert_eq!(parse_bytes(published), Ok(c.allocatable));
        assert_eq!(c.pending, 0);
    }
});
