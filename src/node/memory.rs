//! The agent's own memory on the node: how the allocator is set up, and giving freed memory back.
//!
//! glibc's malloc keeps what a program frees in per-thread arenas and returns it to the system only
//! from the top of each heap, so after a burst (a thousand volumes deleted, every watch relisting)
//! the agent's RSS stayed at its peak. Measured with `cargo bench --bench memory` (README): two
//! arenas instead of glibc's 8 per core, and a `malloc_trim` once a burst of frees has settled, bring
//! RSS back to within a few hundred KiB of where it was. `MALLOC_ARENA_MAX` in the environment still
//! wins, so the choice can be re-measured without a rebuild.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::debug;

/// Arenas for the whole process: the agent does little in parallel, and each arena keeps its frees.
const ARENAS: i32 = 2;
/// Quiet time after the last burst of frees before trimming (a trim walks the heap).
const SETTLE: Duration = Duration::from_secs(2);

/// Sets the allocator up; call first thing in `main`, before any thread starts.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes malloc's parameters; no other thread allocates yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Gives freed memory back to the system once frees have settled (many objects went). Cheap to call
/// often: calls within `SETTLE` of each other make one trim. Needs a tokio runtime.
pub fn release_soon() {
    static WAKE: OnceLock<Arc<tokio::sync::Notify>> = OnceLock::new();
    WAKE.get_or_init(|| {
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(trimmer(wake.clone()));
        wake
    })
    .notify_one();
}

async fn trimmer(wake: Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        // Wait until the burst is over: every new call restarts the quiet time.
        while tokio::time::timeout(SETTLE, wake.notified()).await.is_ok() {}
        let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
        debug!(released, "returned freed memory to the system");
    }
}

/// Returns free heap pages to the system; true if any were.
fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim is thread-safe and only releases memory malloc holds free.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
