//! Request messages of the node service, decoded from any bytes a client sends: never a panic; a
//! GetVolume name is accepted only if it is a PV name; a WatchCapacity interval is 1 s to 1 h.
#![no_main]
use std::time::Duration;

use hostvol::service::grpc::v1::{GetVolumeRequest, WatchCapacityRequest};
use hostvol::service::node_service::{requested_pv_name, watch_interval};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = GetVolumeRequest::decode(data) {
        let name = &request.pv_name;
        match requested_pv_name(name) {
            Ok(()) => assert!(!name.is_empty() && !name.contains('/') && name.len() <= 253),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::InvalidArgument);
                assert!(status.message().contains("not a PersistentVolume name"));
            }
        }
    }
    if let Ok(request) = WatchCapacityRequest::decode(data) {
        let interval = watch_interval(request.max_interval_seconds);
        assert!((Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&interval));
    }
});
