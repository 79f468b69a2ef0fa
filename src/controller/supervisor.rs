//! Every background task of the agent runs here: one that ends while the agent is not shutting down,
//! or panics, is logged with its name, counted in `hostvol_task_restarts_total{task}` and started
//! again after a backoff (1 s doubling to 60 s, back to 1 s after a minute of good running). While a
//! [`Rule::Vital`] task is down, `/healthz` fails naming it, so a task that keeps dying gets the pod
//! restarted by the kubelet; a [`Rule::Restart`] task only restarts (the agent serves without it
//! meanwhile). One shutdown signal still stops them all.

use std::collections::BTreeSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::controller::metrics::Metrics;

/// First wait before a restart.
pub const FIRST_RESTART: Duration = Duration::from_secs(1);
/// Longest wait before a restart.
pub const MAX_RESTART: Duration = Duration::from_secs(60);
/// A task that ran this long before it ended starts again after [`FIRST_RESTART`].
const GOOD_RUN: Duration = Duration::from_secs(60);

/// What a task's death means for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The agent cannot serve without it: `/healthz` fails while it is down.
    Vital,
    /// The agent serves without it for a while: restarted, `/healthz` unaffected.
    Restart,
}

/// The vital tasks that are down now, for `/healthz`.
#[derive(Debug, Default)]
pub struct Health {
    down: parking_lot::Mutex<BTreeSet<&'static str>>,
}

impl Health {
    /// `Ok` or the names of the vital tasks that are down.
    pub fn check(&self) -> Result<(), String> {
        let down = self.down.lock();
        if down.is_empty() {
            Ok(())
        } else {
            Err(down.iter().copied().collect::<Vec<_>>().join(", "))
        }
    }

    fn set(&self, task: &'static str, down: bool) {
        let mut set = self.down.lock();
        if down {
            set.insert(task);
        } else {
            set.remove(task);
        }
    }
}

/// The wait before restart number `restarts` (counted since the last good run).
pub fn restart_delay(restarts: u32) -> Duration {
    FIRST_RESTART
        .saturating_mul(1 << restarts.min(16))
        .min(MAX_RESTART)
}

/// What a panic said, for the log and the Event.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

pub struct Supervisor {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Supervisor {
            metrics,
            health: Arc::default(),
            shutdown,
            tasks: parking_lot::Mutex::default(),
        })
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs `make()` as task `name` until shutdown, restarting it as the module says. Each run is a
    /// new future from `make`, so a restarted task starts from its own beginning.
    pub fn spawn<F, Fut>(&self, name: &'static str, rule: Rule, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (metrics, health, shutdown) = (
            self.metrics.clone(),
            self.health.clone(),
            self.shutdown.clone(),
        );
        let handle = tokio::spawn(async move {
            let mut restarts = 0u32;
            loop {
                let started = Instant::now();
                let run = make();
                let run = async move {
                    // A test makes a task panic or end here (see tests/supervision.rs).
                    fail::fail_point!(name, |_| ());
                    run.await
                };
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    outcome = AssertUnwindSafe(run).catch_unwind() => outcome,
                };
                if shutdown.is_cancelled() {
                    return;
                }
                match outcome {
                    Ok(()) => error!(
                        task = name,
                        "task ended while the agent runs; restarting it"
                    ),
                    Err(panic) => error!(
                        task = name,
                        panic = %panic_message(&*panic),
                        "task panicked; restarting it"
                    ),
                }
                if started.elapsed() >= GOOD_RUN {
                    restarts = 0;
                }
                let delay = restart_delay(restarts);
                restarts = restarts.saturating_add(1);
                metrics.task_restarted(name);
                if rule == Rule::Vital {
                    health.set(name, true);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                health.set(name, false);
                info!(task = name, restarts, "task restarted");
            }
        });
        self.tasks.lock().push(handle);
    }

    /// Waits until every task has stopped (after shutdown).
    pub async fn join(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn restarts_back_off_from_one_second_to_a_minute() {
        let table = [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (30, 60)];
        for (restarts, secs) in table {
            assert_eq!(
                restart_delay(restarts),
                Duration::from_secs(secs),
                "{restarts}"
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_vital_task_is_restarted_and_fails_health_while_down() {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(metrics.clone(), shutdown.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let started = runs.clone();
        supervisor.spawn("flaky", Rule::Vital, move || {
            let n = started.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("first run fails");
                }
                std::future::pending::<()>().await
            }
        });
        let health = supervisor.health();
        while runs.load(Ordering::SeqCst) == 0 || health.check().is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(health.check(), Err("flaky".to_string()));
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(health.check(), Ok(()));
        assert_eq!(metrics.task_restarts("flaky"), 1);
        shutdown.cancel();
        supervisor.join().await;
    }
}
