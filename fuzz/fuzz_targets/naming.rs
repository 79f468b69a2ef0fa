//! Claim uid, namespace and claim names to PV and directory names: never a panic, and an accepted
//! directory name is one plain component inside the root (no '/', not '.' or '..', not hidden, at most
//! NAME_MAX) that starts with its PV name (so two claims never share a directory).
#![no_main]
use hostvol::domain::naming::{
    MAX_DIRECTORY_NAME, directory_name, node_label_value, pv_name, validate_directory_name,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, &str)| {
    let (uid, namespace, claim) = input;
    let label = node_label_value(claim);
    assert!(label.len() <= 63, "{claim:?} -> {label:?}");
    let Ok(pv) = pv_name(uid) else { return };
    match directory_name(&pv, namespace, claim) {
        Ok(dir) => {
            assert!(validate_directory_name(&dir).is_ok());
            assert!(dir.len() <= MAX_DIRECTORY_NAME);
            assert!(!dir.contains('/') && dir != "." && dir != ".." && !dir.starts_with('.'));
            assert!(dir.starts_with(&format!("{pv}_")), "{dir:?}");
            assert_eq!(
                std::path::Path::new("/root").join(&dir).parent(),
                Some(std::path::Path::new("/root"))
            );
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
});
