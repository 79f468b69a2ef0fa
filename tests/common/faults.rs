//! Control-plane faults for `tests/faults.rs`: killing, pausing (SIGSTOP/SIGCONT) and restarting etcd
//! and kube-apiserver with the command they were first started with (same ports, same etcd data
//! directory), and the API server's own request counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::control_plane::wait_process_ready;
use super::process;
use super::{Cluster, http};

pub const ETCD: &str = "etcd";
pub const APISERVER: &str = "kube-apiserver";

impl Cluster {
    fn with_component<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut super::control_plane::Component) -> T,
    ) -> T {
        let mut comps = self.components.lock().unwrap();
        let comp = comps
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no control-plane component {name}"));
        f(comp)
    }

    /// SIGKILL `name` (etcd, kube-apiserver, ...) and reap it.
    pub fn kill_component(&self, name: &str) {
        self.with_component(name, |c| {
            process::signal_group(c.child.id(), libc::SIGKILL);
            let _ = c.child.kill();
            let _ = c.child.wait();
        });
    }

    /// SIGSTOP: the process keeps its sockets, so clients connect and then wait for answers.
    pub fn pause_component(&self, name: &str) {
        self.with_component(name, |c| process::signal_group(c.child.id(), libc::SIGSTOP));
    }

    /// SIGCONT after `pause_component`.
    pub fn resume_component(&self, name: &str) {
        self.with_component(name, |c| process::signal_group(c.child.id(), libc::SIGCONT));
    }

    /// Starts a killed component again with its first command line (the same ports and data directory)
    /// and waits until it serves: etcd `/health`, kube-apiserver `/readyz`. Returns how long that took.
    pub async fn start_component_again(&self, name: &str) -> Duration {
        let t0 = Instant::now();
        let (program, args, log) = self.with_component(name, |c| {
            assert!(
                !matches!(c.child.try_wait(), Ok(None)),
                "{name} is still running"
            );
            (c.program.clone(), c.args.clone(), c.log.clone())
        });
        let mut cmd = std::process::Command::new(&program);
        cmd.args(&args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k); // etcd reads ETCD_* variables as flags
            }
        }
        let child = process::spawn_logged(cmd, &self.path, &log)
            .unwrap_or_else(|e| panic!("spawn {name} again: {e}"));
        self.registry.register(name, child.id());
        let old = self.with_component(name, |c| std::mem::replace(&mut c.child, child));
        drop(old);
        // Wait outside the lock: the readiness probe takes a while.
        let etcd_health: Option<SocketAddr> = args
            .windows(2)
            .find(|w| w[0] == "--listen-client-urls")
            .and_then(|w| w[1].to_str()?.strip_prefix("http://")?.parse().ok());
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let exited = self.with_component(name, |c| c.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "{name} exited after restart ({status})\n--- {} ---\n{}",
                    log.display(),
                    process::tail(&log, 40)
                );
            }
            let ok = match (name, etcd_health) {
                (ETCD, Some(addr)) => matches!(http::get(addr, "/health").await, Ok((200, _))),
                (APISERVER, _) => {
                    let req = ::http::Request::get("/readyz").body(Vec::new()).unwrap();
                    matches!(
                        tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await,
                        Ok(Ok(body)) if body.trim() == "ok"
                    )
                }
                _ => true,
            };
            if ok {
                return t0.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{name} not serving 90 s after restart\n{}",
                self.diag()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The API server's `apiserver_request_total`, summed by (verb, resource). Counts start at zero
    /// when the API server (re)starts.
    pub async fn apiserver_requests(&self) -> BTreeMap<(String, String), f64> {
        let req = ::http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = self
            .client()
            .request_text(req)
            .await
            .unwrap_or_else(|e| panic!("GET /metrics of the API server: {e}"));
        let mut counts = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
        {
            let (labels, value) = line.rsplit_once(' ').unwrap();
            let label = |key: &str| {
                labels
                    .split([',', '{', '}'])
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            *counts
                .entry((label("verb"), label("resource")))
                .or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
        counts
    }
}

impl Cluster {
    /// The API server's non-watch requests on CSIStorageCapacity objects so far, by verb (`APPLY`,
    /// `PATCH`, `CREATE`, `DELETE`, `LIST`, ...): only agents write them, so the writes are the
    /// agents' publisher at work. Subtract two readings to count a window.
    pub async fn capacity_requests(&self) -> BTreeMap<String, u64> {
        let mut by_verb = BTreeMap::new();
        for ((verb, resource), n) in self.apiserver_requests().await {
            if resource == "csistoragecapacities" && verb != "WATCH" {
                *by_verb.entry(verb).or_insert(0) += n as u64;
            }
        }
        by_verb
    }
}

/// Requests of `after` not yet in `before` (two readings of `Cluster::capacity_requests`), and
/// how many of them wrote (any verb but GET and LIST).
pub fn requests_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (BTreeMap<String, u64>, u64) {
    let window: BTreeMap<String, u64> = after
        .iter()
        .map(|(verb, n)| {
            (
                verb.clone(),
                n.saturating_sub(before.get(verb).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let writes = window
        .iter()
        .filter(|(verb, _)| !matches!(verb.as_str(), "GET" | "LIST"))
        .map(|(_, n)| n)
        .sum();
    (window, writes)
}

/// Keeps the readiness of an agent as seen over time: (time since start, ready) at every change.
pub async fn readiness_timeline(
    addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(Duration, bool)> {
    let t0 = Instant::now();
    let mut changes: Vec<(Duration, bool)> = Vec::new();
    while !stop.is_cancelled() {
        let ready = matches!(http::get(addr, "/readyz").await, Ok((200, _)));
        if changes.last().map(|(_, r)| *r) != Some(ready) {
            changes.push((t0.elapsed(), ready));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One last look: the caller stops us right after it saw a change (e.g. ready again), which the
    // 200 ms sampling may not have caught yet.
    let ready = matches!(http::get(addr, "/readyz").await, Ok((200, _)));
    if changes.last().map(|(_, r)| *r) != Some(ready) {
        changes.push((t0.elapsed(), ready));
    }
    changes
}
