//! The `hostvol-config` ConfigMap's `config.yaml`, read for a few node names: never a panic; every
//! accepted root path is absolute, below `/` (not `/` itself), in one spelling; every rejection is a
//! message.
#![no_main]
use std::path::{Component, Path};

use hostvol::node::roots::parse_config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for node in ["node-a", "node-b", "*"] {
        match parse_config(text, node) {
            Ok(Some(roots)) => {
                for (name, spec) in roots {
                    assert!(!name.is_empty() && name.len() <= 63, "{name:?}");
                    let mut components = Path::new(&spec.path).components();
                    assert_eq!(components.next(), Some(Component::RootDir), "{:?}", spec.path);
                    let rest: Vec<_> = components.collect();
                    assert!(!rest.is_empty(), "{:?}", spec.path);
                    assert!(
                        rest.iter().all(|c| matches!(c, Component::Normal(_))),
                        "{:?}",
                        spec.path
                    );
                }
            }
            Ok(None) => {}
            Err(why) => assert!(!why.is_empty()),
        }
    }
});
