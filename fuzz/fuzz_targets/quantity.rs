//! Quantities from claims, PVs, the ConfigMap and CSIStorageCapacity objects: never a panic; what parses
//! formats back to the same bytes; every rejection says the input is not a valid quantity.
#![no_main]
use hostvol::domain::quantity::{format_bytes, parse_bytes, to_quantity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    match parse_bytes(input) {
        Ok(bytes) => {
            assert_eq!(parse_bytes(&to_quantity(bytes)), Ok(bytes), "{input:?}");
            assert!(!format_bytes(bytes).is_empty());
        }
        Err(e) => assert!(e.0.contains("not a valid quantity"), "{input:?}: {e}"),
    }
});
