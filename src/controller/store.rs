//! Waiting on the watches' stores, shared by every task that reads them, and what the watch of our
//! CSIStorageCapacity objects tells their publisher.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Which of this node's objects the watch saw change, for the publisher to check against what it
/// wrote: something else (the garbage collector, a user) may have deleted or changed one.
#[derive(Default)]
pub struct Changes {
    /// Names of our objects added, changed or deleted since the publisher last looked.
    touched: parking_lot::Mutex<HashSet<String>>,
    /// The watch listed again: objects deleted meanwhile left the cache without an event.
    relisted: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Changes {
    /// Called by the watch (after the cache took the event) for every object of this node.
    pub fn touched(&self, name: String) {
        self.touched.lock().insert(name);
        self.wake.notify_one();
    }

    pub fn relisted(&self) {
        self.relisted.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Waits until the watch saw something change.
    pub async fn notified(&self) {
        self.wake.notified().await
    }

    pub fn take(&self) -> (HashSet<String>, bool) {
        let touched = std::mem::take(&mut *self.touched.lock());
        (touched, self.relisted.swap(false, Ordering::AcqRel))
    }
}
