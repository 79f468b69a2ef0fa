//! Waiting out an API server that does not answer, politely and briefly.
//!
//! kube's default watcher backoff grows to 30 s, so after an outage the agent came back up to half a
//! minute late; and every watch and retry loop retrying on its own made each agent knock several
//! times a second while the API server was away. Here one shared [`ApiProbe`] per agent asks
//! `GET /version` about every [`PROBE_INTERVAL`] while the API server is unreachable, and every watch
//! and retry loop waits on it ([`ApiProbe::until_api_answers`]) instead of retrying blind: at most
//! one connection attempt per probe interval in total during an outage, and all of them resume as
//! soon as the probe gets an answer. Failures with the API server answering (a refused list, a
//! desynced watch) back off on their own, jittered, from 1 s to at most [`MAX_BACKOFF`].

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Client;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Mean time between two probes while the API server is unreachable (jittered by a fifth), so an
/// agent makes fewer than one connection attempt per second during an outage.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(1500);
/// A probe slower than this counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// First wait after a failure while the API server answers.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait after repeated failures while the API server answers.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `d` scaled by a random factor in [1 - spread, 1 + spread], so agents and watches do not retry in
/// lockstep.
pub fn jittered(d: Duration, spread: f64) -> Duration {
    d.mul_f64(1.0 - spread + 2.0 * spread * fastrand::f64())
}

/// Exponential backoff, jittered: 1 s, 2 s, 4 s, then 5 s (each ±20 %); `reset` after a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The unjittered wait after the current run of failures (for tests and figures).
    pub fn base(failures: u32) -> Duration {
        MIN_BACKOFF
            .saturating_mul(1 << failures.min(16))
            .min(MAX_BACKOFF)
    }

    pub fn next_wait(&mut self) -> Duration {
        let wait = Self::base(self.failures);
        self.failures = self.failures.saturating_add(1);
        jittered(wait, 0.2)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Whether the API server answered the last time anyone asked, and the one task that asks again
/// while it does not.
pub struct ApiProbe {
    client: Client,
    up: watch::Sender<bool>,
}

impl ApiProbe {
    pub fn new(client: Client) -> Arc<Self> {
        Arc::new(ApiProbe {
            client,
            up: watch::Sender::new(true),
        })
    }

    /// Called by whoever saw a request fail: until the probe gets an answer, everyone waits on it.
    pub fn failed(&self) {
        if self.up.send_if_modified(|up| std::mem::replace(up, false)) {
            warn!("a request to the API server failed; probing it before anyone retries");
        }
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Returns at once while the API server answers; otherwise when the probe gets an answer.
    pub async fn until_api_answers(&self) {
        let mut up = self.up.subscribe();
        // The sender lives as long as `self`: an error cannot happen while we borrow it.
        let _ = up.wait_for(|up| *up).await;
    }

    /// Probes while the API server is reported unreachable, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut up = self.up.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                down = up.wait_for(|up| !*up) => if down.is_err() { return },
            }
            let mut attempts = 0u32;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(jittered(PROBE_INTERVAL, 0.2)) => {}
                }
                attempts += 1;
                match tokio::time::timeout(PROBE_TIMEOUT, self.client.apiserver_version()).await {
                    Ok(Ok(_)) => {
                        if attempts > 1 {
                            info!(attempts, "the API server answers again");
                        }
                        self.up.send_replace(true);
                        break;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, attempts, "API server probe failed"),
                    Err(_) => tracing::debug!(attempts, "API server probe timed out"),
                }
            }
        }
    }
}

/// A watch stream that, instead of kube's default backoff (up to 30 s), waits on a failure for a
/// jittered [`Backoff`] and then for the shared probe: its next attempt comes when the API server
/// answers. The error is still passed on (for logs and readiness).
pub fn probed<S, K>(
    stream: S,
    probe: Arc<ApiProbe>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + use<S, K>
where
    S: Stream<Item = Result<K, watcher::Error>> + Send,
    K: Send,
{
    let backoff = Arc::new(parking_lot::Mutex::new(Backoff::default()));
    stream.then(move |item| {
        let (probe, backoff) = (probe.clone(), backoff.clone());
        async move {
            match &item {
                Ok(_) => backoff.lock().reset(),
                Err(_) => {
                    probe.failed();
                    let wait = backoff.lock().next_wait();
                    tokio::time::sleep(wait.min(MIN_BACKOFF)).await;
                    probe.until_api_answers().await;
                    // Only failures with the API server answering wait longer (up to 5 s).
                    tokio::time::sleep(wait.saturating_sub(MIN_BACKOFF)).await;
                }
            }
            item
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_from_one_to_five_seconds() {
        let table = [(0, 1), (1, 2), (2, 4), (3, 5), (10, 5), (40, 5)];
        for (failures, secs) in table {
            assert_eq!(
                Backoff::base(failures),
                Duration::from_secs(secs),
                "{failures}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        for _ in 0..1000 {
            let d = jittered(PROBE_INTERVAL, 0.2);
            assert!(d >= Duration::from_millis(1200) && d <= Duration::from_millis(1800));
        }
    }

    #[test]
    fn a_success_resets_the_backoff() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_wait();
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(1200));
    }
}
