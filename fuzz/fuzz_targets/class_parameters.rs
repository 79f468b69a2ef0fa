//! StorageClass parameters: never a panic; an error names a parameter the class set.
#![no_main]
use std::collections::BTreeMap;

use hostvol::domain::params::ClassParameters;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|parameters: BTreeMap<String, String>| {
    match ClassParameters::parse(&parameters) {
        Ok(p) => {
            assert!(p.mode <= 0o7777);
            assert!(!p.data_root.is_empty() && !p.data_root.contains('/'));
        }
        Err(why) => assert!(
            parameters.keys().any(|k| why.contains(k.as_str())),
            "{parameters:?}: {why}"
        ),
    }
});
