//! One lock per volume, so slow work on one volume (making or copying it, raising or putting back its
//! size limit) holds only that volume, never the node: the node-wide admission lock guards the
//! arithmetic alone (see `Context::reserve`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use tokio::sync::OwnedMutexGuard;

/// Locks by volume (PV) name. Only locks someone holds or waits for are kept: memory follows the
/// work in flight, not the number of volumes.
#[derive(Default)]
pub struct VolumeLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl VolumeLocks {
    /// Waits for volume `name`'s lock; it is held until the guard is dropped.
    pub async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock();
            locks.retain(|_, lock| lock.strong_count() > 0);
            match locks.get(name).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(name.to_string(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// Volumes whose lock is held or awaited now.
    pub fn in_use(&self) -> usize {
        let locks = self.locks.lock();
        locks
            .values()
            .filter(|lock| lock.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_volume_waits_only_for_itself() {
        let locks = Arc::new(VolumeLocks::default());
        let held = locks.lock("pvc-a").await;
        // Another volume's lock is free at once.
        let other = tokio::time::timeout(Duration::from_secs(5), locks.lock("pvc-b"))
            .await
            .expect("pvc-b does not wait for pvc-a");
        drop(other);
        // The same volume waits until the holder is done.
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _guard = locks.lock("pvc-a").await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "pvc-a is still held");
        drop(held);
        waiter.await.unwrap();
        assert_eq!(
            locks.in_use(),
            0,
            "nothing is kept once no one holds a lock"
        );
        let _again = locks.lock("pvc-c").await;
        assert_eq!(locks.locks.lock().len(), 1, "released locks are dropped");
    }
}
