//! Waiting on the watches' stores, shared by every task that reads them.

use std::time::Duration;

use kube::runtime::reflector::Store;

/// Waits for a store's first sync. kube's readiness signal wakes only one waiter (a oneshot under the
/// hood) and the controller also waits on the claims store, so poll instead of relying on the wake-up.
pub async fn store_ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(result) => return result.is_ok(),
            Err(_elapsed) => continue,
        }
    }
}
