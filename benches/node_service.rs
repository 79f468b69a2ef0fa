//! Benchmark of the gRPC node service (`hostvol.v1.Node`) of a real `hostvol agent` on a real
//! Kubernetes 1.20 control plane (the e2e harness of tests/common), and of the usage walk
//! (`usage::refresh`, re-exported by the harness). It prints figures; it asserts nothing about timing.
//!
//! Run: `cargo bench --bench node_service` (needs `scripts/setup-control-plane.sh` first). `cargo
//! bench` builds the agent with the bench profile (release); the path of the binary run is printed.
//!
//! 1. GetCapacity latency: one agent with N volumes (default 50: claims carrying
//!    `volume.kubernetes.io/selected-node`, class `hostvol` from deploy/storageclass.yaml, all Bound),
//!    one client, C sequential calls (default 5,000, after 200 warm-up calls), over loopback TCP and
//!    over the agent's Unix socket: median, p90, p99, max in microseconds.
//! 2. Throughput: K clients (default 16), each on its own channel (own connection), calling
//!    GetCapacity back to back for S seconds (default 5), over TCP and over the Unix socket: calls/s,
//!    with the agent's CPU time per call. Then ListVolumes (N volumes): latency of 1,000 sequential
//!    calls, over TCP and over the Unix socket.
//! 3. Usage refresh (no cluster): D volume directories (default 1,000) with F files each (default
//!    100; 100,000 in total, 1-5 KiB each, spread over the top directory and two nested
//!    subdirectories) in a temp dir (TMPDIR), then `usage::refresh` over all of them with
//!    concurrency 2 (the agent's default), twice: wall time, files/s, peak RSS growth of this process.
//!    The page cache cannot be dropped here: the first run follows the creation of the files, so
//!    their inodes are mostly cached; the figures are an in-memory (metadata-cached) walk.
//!
//! Environment: `HOSTVOL_BENCH_VOLUMES` (50), `HOSTVOL_BENCH_CALLS` (5000), `HOSTVOL_BENCH_CLIENTS`
//! (16), `HOSTVOL_BENCH_SECONDS` (5), `HOSTVOL_BENCH_USAGE_DIRS` (1000), `HOSTVOL_BENCH_USAGE_FILES`
//! (100 per directory), `HOSTVOL_BENCH_ONLY` (`grpc` or `usage`: run one part), plus the harness's
//! variables (`HOSTVOL_E2E_KEEP=1` keeps the cluster dir and logs; `HOSTVOL_BIN` overrides the agent).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::grpc::node_client::NodeClient;
use common::grpc::{GetCapacityRequest, ListVolumesRequest};
use common::usage::{self, UsageCache};
use common::{Address, Agent, Cluster, capacity_report, connect};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams, PostParams};
use support::{
    Summary, agent_exe, build_kind, claim, cores, env_usize, loadavg, requested, rss_mib, runtime,
    summarize_us, us,
};
use tonic::transport::Channel;

const NODE: &str = "node-a";
const NS: &str = "bench";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WARMUP: usize = 200;
const LIST_CALLS: usize = 1000;
/// The agent's default `--usage-concurrency`.
const USAGE_CONCURRENCY: usize = 2;

fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("load average: {}", loadavg()))
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (to tell our share of the 2 cores from the other engineers' tests)
// ---------------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// (busy, total) CPU seconds of the whole machine, all cores.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clock_ticks(), total / clock_ticks())
}

struct CpuWindow {
    agent_pid: Option<u32>,
    agent: f64,
    me: f64,
    machine: (f64, f64),
    wall: Instant,
}

impl CpuWindow {
    fn start(agent_pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            agent_pid,
            agent: agent_pid.map(|p| proc_cpu(&p.to_string())).unwrap_or(0.0),
            me: proc_cpu("self"),
            machine: machine_cpu(),
            wall: Instant::now(),
        }
    }

    /// CPU seconds of the agent, this process and everything else over the window.
    fn stop(&self) -> CpuUse {
        let wall = self.wall.elapsed().as_secs_f64();
        let agent = self
            .agent_pid
            .map(|p| proc_cpu(&p.to_string()))
            .unwrap_or(0.0)
            - self.agent;
        let me = proc_cpu("self") - self.me;
        let (busy, total) = machine_cpu();
        let busy = busy - self.machine.0;
        let cores = ((total - self.machine.1) / wall).round().max(1.0);
        CpuUse {
            agent,
            me,
            others: (busy - agent - me).max(0.0),
            wall,
            cores,
        }
    }
}

struct CpuUse {
    agent: f64,
    me: f64,
    others: f64,
    wall: f64,
    cores: f64,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |s: f64| 100.0 * s / self.wall;
        write!(
            f,
            "CPU over {:.1} s on {} cores: agent {:.0}%, bench process {:.0}%, other processes {:.0}% (of one core)",
            self.wall,
            self.cores,
            pct(self.agent),
            pct(self.me),
            pct(self.others)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

/// Resets this process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0); false if not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// Part 1 + 2: the node service of a real agent
// ---------------------------------------------------------------------------------------------

/// Creates `n` claims selected onto the agent's node (8 requests in flight) and waits until all are
/// Bound and the agent counts them.
async fn provision(cluster: &Cluster, agent: &Agent, n: usize) {
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace(NS).await;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), NS);
    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &claim(NS, &format!("c{i}"), "hostvol", "1Gi", Some(NODE)),
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await
        .unwrap_or_else(|e| panic!("create claim: {e}\n{}", cluster.diag()));
    let bound = |l: &[PersistentVolumeClaim]| {
        l.iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .count()
    };
    cluster
        .wait_for(
            || async {
                api.list(&ListParams::default())
                    .await
                    .map(|l| bound(&l.items) >= n)
                    .unwrap_or(false)
            },
            Duration::from_secs(120),
            &format!("{n} claims Bound"),
        )
        .await;
    let mut client = connect(&agent.grpc_tcp(), CONNECT_TIMEOUT)
        .await
        .expect("connect to the agent");
    cluster
        .wait_for(
            || {
                let mut client = client.clone();
                async move {
                    client
                        .get_capacity(GetCapacityRequest {})
                        .await
                        .map(|r| r.into_inner().volume_count as usize >= n)
                        .unwrap_or(false)
                }
            },
            Duration::from_secs(30),
            &format!("agent reports {n} volumes"),
        )
        .await;
    let report = capacity_report(&mut client).await;
    eprintln!(
        "[bench] {n} claims Bound in {:.1} s; agent reports {} volumes, {} bytes allocated, filesystem {}",
        t0.elapsed().as_secs_f64(),
        report.volume_count,
        report.allocated_bytes,
        report.filesystem_type
    );
}

/// The agent's node service over loopback TCP and over its Unix socket, with their names.
fn transports(agent: &Agent) -> [(&'static str, Address); 2] {
    [
        ("TCP", agent.grpc_tcp()),
        ("Unix socket", agent.grpc_unix()),
    ]
}

/// `calls` sequential GetCapacity calls on one channel, after a warm-up.
async fn sequential_get_capacity(client: &mut NodeClient<Channel>, calls: usize) -> Summary {
    for _ in 0..WARMUP {
        capacity_report(client).await;
    }
    time_calls(calls, async || {
        capacity_report(client).await;
    })
    .await
}

/// Latencies of `calls` sequential calls of `call`.
async fn time_calls(calls: usize, mut call: impl AsyncFnMut()) -> Summary {
    let mut lat = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        call().await;
        lat.push(us(t.elapsed()));
    }
    summarize_us(lat)
}

struct Throughput {
    calls: u64,
    errors: u64,
    per_sec: f64,
    latency: Summary,
    cpu: CpuUse,
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} calls/s ({} calls, {} errors); per-call latency under load: {}; agent CPU {:.0} us per call",
            self.per_sec,
            self.calls,
            self.errors,
            self.latency,
            self.cpu.agent * 1e6 / self.calls.max(1) as f64
        )
    }
}

/// `clients` tasks, each on its own channel, calling GetCapacity back to back for `seconds`.
async fn throughput(address: &Address, clients: usize, seconds: u64, agent_pid: u32) -> Throughput {
    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = connect(address, CONNECT_TIMEOUT).await.expect("connect");
        c.get_capacity(GetCapacityRequest {})
            .await
            .expect("GetCapacity"); // establish the connection
        channels.push(c);
    }
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let cpu = CpuWindow::start(Some(agent_pid));
    let tasks: Vec<_> = channels
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::with_capacity(65536));
                while tokio::time::Instant::now() < deadline {
                    let t = Instant::now();
                    match c.get_capacity(GetCapacityRequest {}).await {
                        Ok(_) => {
                            ok += 1;
                            lat.push(us(t.elapsed()));
                        }
                        Err(_) => errors += 1,
                    }
                }
                (ok, errors, lat)
            })
        })
        .collect();
    let (mut calls, mut errors, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, e, l) = t.await.expect("client task");
        calls += o;
        errors += e;
        lat.extend(l);
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    Throughput {
        calls,
        errors,
        per_sec: calls as f64 / wall,
        latency: summarize_us(lat),
        cpu,
    }
}

async fn list_volumes_latency(
    client: &mut NodeClient<Channel>,
    volumes: usize,
) -> (Summary, usize) {
    let mut size = 0;
    for _ in 0..50 {
        let r = client
            .list_volumes(ListVolumesRequest {})
            .await
            .expect("ListVolumes")
            .into_inner();
        assert_eq!(r.volumes.len(), volumes, "ListVolumes returns every volume");
        size = prost::Message::encoded_len(&r);
    }
    let latency = time_calls(LIST_CALLS, async || {
        client
            .list_volumes(ListVolumesRequest {})
            .await
            .expect("ListVolumes");
    })
    .await;
    (latency, size)
}

#[derive(Default)]
struct GrpcReport {
    volumes: usize,
    tcp: Option<Summary>,
    unix: Option<Summary>,
    tcp_tp: Option<Throughput>,
    unix_tp: Option<Throughput>,
    list_tcp: Option<(Summary, usize)>,
    list_unix: Option<(Summary, usize)>,
    load: Vec<String>,
}

async fn grpc_part(volumes: usize, calls: usize, clients: usize, seconds: u64) -> GrpcReport {
    let mut r = GrpcReport {
        volumes,
        ..Default::default()
    };
    let cluster = Cluster::start().await;
    cluster.add_node(NODE).await;
    let agent = cluster.start_agent(NODE, &[]).await;
    eprintln!(
        "[bench] agent {NODE} runs {} (pid {}); gRPC {} and {}",
        agent_exe(&agent),
        agent.pid(),
        agent.grpc_addr,
        agent.grpc_socket.display()
    );
    provision(&cluster, &agent, volumes).await;
    // Let the agent's first usage walk of the new volumes and the PV controller's last updates settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    for (name, address) in transports(&agent) {
        let mut client = connect(&address, CONNECT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("connect {address}: {e}"));
        eprintln!(
            "[bench] part 1: {calls} sequential GetCapacity calls over {name} ({address}); load {}",
            loadavg()
        );
        let cpu = CpuWindow::start(Some(agent.pid()));
        let s = sequential_get_capacity(&mut client, calls).await;
        let cpu = cpu.stop();
        eprintln!(
            "[bench]   {s}\n[bench]   {cpu}; agent CPU {:.0} us per call",
            cpu.agent * 1e6 / (calls + WARMUP) as f64
        );
        r.load
            .push(format!("part 1 {name}: load {}; {cpu}", loadavg()));
        if name == "TCP" {
            r.tcp = Some(s)
        } else {
            r.unix = Some(s)
        }
    }

    for (name, address) in transports(&agent) {
        eprintln!(
            "[bench] part 2: {clients} clients on separate channels, GetCapacity for {seconds} s over {name}; load {}",
            loadavg()
        );
        let t = throughput(&address, clients, seconds, agent.pid()).await;
        eprintln!("[bench]   {t}\n[bench]   {}", t.cpu);
        r.load
            .push(format!("part 2 {name}: load {}; {}", loadavg(), t.cpu));
        if name == "TCP" {
            r.tcp_tp = Some(t)
        } else {
            r.unix_tp = Some(t)
        }
    }

    for (name, address) in transports(&agent) {
        let mut client = connect(&address, CONNECT_TIMEOUT).await.expect("connect");
        eprintln!(
            "[bench] part 2: {LIST_CALLS} sequential ListVolumes calls ({volumes} volumes) over {name}; load {}",
            loadavg()
        );
        let (s, size) = list_volumes_latency(&mut client, volumes).await;
        eprintln!("[bench]   {s}; response {size} bytes");
        if name == "TCP" {
            r.list_tcp = Some((s, size))
        } else {
            r.list_unix = Some((s, size))
        }
    }
    eprintln!("[bench] agent log: {}", agent.log_path().display());
    r
}

// ---------------------------------------------------------------------------------------------
// Part 3: usage refresh
// ---------------------------------------------------------------------------------------------

/// Relative paths (inside one volume directory) of the `files` files: 40% at the top, 30% in
/// `data/`, 30% in `data/sub/`.
fn layout(files: usize) -> Vec<String> {
    let top = files * 4 / 10;
    let mid = files * 3 / 10;
    (0..files)
        .map(|j| {
            if j < top {
                format!("f{j}")
            } else if j < top + mid {
                format!("data/f{j}")
            } else {
                format!("data/sub/f{j}")
            }
        })
        .collect()
}

/// Creates `dirs` volume directories under `root` with `files` files each (1-5 KiB), on 2 threads.
/// Returns the directory names and the bytes written.
fn build_tree(root: &Path, dirs: usize, files: usize) -> (Vec<String>, u64) {
    let names: Vec<String> = (0..dirs)
        .map(|i| format!("pvc-bench-{i:05}_bench_claim-{i}"))
        .collect();
    let paths = layout(files);
    let payload = vec![0x5au8; 5 * 1024];
    let written = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for half in names.chunks(names.len().div_ceil(2).max(1)) {
            let (paths, payload, written) = (&paths, &payload, &written);
            s.spawn(move || {
                let mut bytes = 0u64;
                for (k, name) in half.iter().enumerate() {
                    let dir = root.join(name);
                    std::fs::create_dir_all(dir.join("data/sub")).expect("create volume dirs");
                    for (j, p) in paths.iter().enumerate() {
                        let len = 1024 + (k * 131 + j * 977) % (4 * 1024);
                        std::fs::write(dir.join(p), &payload[..len]).expect("write file");
                        bytes += len as u64;
                    }
                }
                written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    (names, written.into_inner())
}

struct UsageRun {
    measured: usize,
    wall: Duration,
    bytes: u64,
    inodes: u64,
    peak_rss_delta: Option<f64>,
    cpu: CpuUse,
}

async fn usage_run(root: &Arc<OwnedFd>, names: &[String]) -> UsageRun {
    let cache = UsageCache::default();
    let (rss_before, _) = rss_mib("self");
    let peak = reset_peak_rss();
    let cpu = CpuWindow::start(None);
    let (measured, wall) = usage::refresh(
        "default",
        root.clone(),
        names.to_vec(),
        &cache,
        USAGE_CONCURRENCY,
    )
    .await;
    let cpu = cpu.stop();
    let (_, hwm) = rss_mib("self");
    let (mut bytes, mut inodes) = (0, 0);
    for n in names {
        if let Some(u) = cache.get("default", n) {
            bytes += u.bytes;
            inodes += u.inodes.unwrap_or(0);
        }
    }
    UsageRun {
        measured,
        wall,
        bytes,
        inodes,
        peak_rss_delta: peak.then_some(hwm - rss_before),
        cpu,
    }
}

struct UsageReport {
    dirs: usize,
    files: usize,
    fs: String,
    build: Duration,
    runs: Vec<UsageRun>,
}

async fn usage_part(dirs: usize, files_per_dir: usize) -> UsageReport {
    let tmp = tempfile::tempdir().expect("temp dir");
    let fs = std::process::Command::new("df")
        .args(["--output=fstype"])
        .arg(tmp.path())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let total = dirs * files_per_dir;
    eprintln!(
        "[bench] part 3: building {dirs} volume directories with {total} files in {} ({fs}); load {}",
        tmp.path().display(),
        loadavg()
    );
    let t0 = Instant::now();
    let (names, written) =
        tokio::task::block_in_place(|| build_tree(tmp.path(), dirs, files_per_dir));
    let build = t0.elapsed();
    eprintln!(
        "[bench]   built in {:.1} s ({:.1} MiB written)",
        build.as_secs_f64(),
        written as f64 / (1 << 20) as f64
    );
    let root = Arc::new(
        nix::fcntl::open(
            tmp.path(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .expect("open temp root"),
    );
    let mut runs = Vec::new();
    for run in 1..=2 {
        let r = usage_run(&root, &names).await;
        eprintln!(
            "[bench]   run {run}: {} / {dirs} measured in {:.0} ms = {:.0} files/s; {:.1} MiB, {} inodes; peak RSS +{}; {}; load {}",
            r.measured,
            r.wall.as_secs_f64() * 1e3,
            total as f64 / r.wall.as_secs_f64(),
            r.bytes as f64 / (1 << 20) as f64,
            r.inodes,
            r.peak_rss_delta
                .map(|m| format!("{m:.1} MiB"))
                .unwrap_or_else(|| "n/a".into()),
            r.cpu,
            loadavg()
        );
        runs.push(r);
    }
    let t = Instant::now();
    drop(root);
    tokio::task::block_in_place(|| drop(tmp));
    eprintln!(
        "[bench]   removed the tree in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    UsageReport {
        dirs,
        files: total,
        fs,
        build,
        runs,
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    // Without `--bench` (`cargo test --benches`), skip the run.
    if !requested("node_service") {
        return;
    }
    let volumes = env_usize("HOSTVOL_BENCH_VOLUMES", 50);
    let calls = env_usize("HOSTVOL_BENCH_CALLS", 5000);
    let clients = env_usize("HOSTVOL_BENCH_CLIENTS", 16);
    let seconds = env_usize("HOSTVOL_BENCH_SECONDS", 5) as u64;
    let usage_dirs = env_usize("HOSTVOL_BENCH_USAGE_DIRS", 1000);
    let usage_files = env_usize("HOSTVOL_BENCH_USAGE_FILES", 100);
    let only = std::env::var("HOSTVOL_BENCH_ONLY").unwrap_or_default();
    let (do_grpc, do_usage) = match only.as_str() {
        "grpc" => (true, false),
        "usage" => (false, true),
        _ => (true, true),
    };
    let agent_bin = common::hostvol_bin();
    eprintln!(
        "[bench] agent binary {} ({} build)",
        agent_bin.display(),
        build_kind()
    );
    let uptime_start = uptime();
    let started = Instant::now();

    let rt = runtime();
    let (grpc, usage) = rt.block_on(async {
        let grpc = if do_grpc {
            Some(grpc_part(volumes, calls, clients, seconds).await)
        } else {
            None
        };
        let usage = if do_usage {
            Some(usage_part(usage_dirs, usage_files).await)
        } else {
            None
        };
        (grpc, usage)
    });
    rt.shutdown_timeout(Duration::from_secs(2));

    let na = || "n/a".to_string();
    println!();
    println!(
        "hostvol node service benchmark ({} cores, Kubernetes {}, {} build; {:.0} s)",
        cores(),
        common::K8S_VERSION,
        build_kind(),
        started.elapsed().as_secs_f64()
    );
    println!("agent binary: {}", agent_bin.display());
    println!("uptime at start: {uptime_start}");
    println!("uptime at end:   {}", uptime());
    if let Some(g) = &grpc {
        println!("-- node service, one agent with {} volumes --", g.volumes);
        println!(
            "GetCapacity, 1 client, sequential, TCP loopback: {}",
            g.tcp.as_ref().map(|s| s.to_string()).unwrap_or_else(na)
        );
        println!(
            "GetCapacity, 1 client, sequential, Unix socket:  {}",
            g.unix.as_ref().map(|s| s.to_string()).unwrap_or_else(na)
        );
        println!(
            "GetCapacity, {clients} clients x {seconds} s, TCP:  {}",
            g.tcp_tp.as_ref().map(|t| t.to_string()).unwrap_or_else(na)
        );
        println!(
            "GetCapacity, {clients} clients x {seconds} s, Unix: {}",
            g.unix_tp.as_ref().map(|t| t.to_string()).unwrap_or_else(na)
        );
        let list = |l: &Option<(Summary, usize)>| {
            l.as_ref()
                .map(|(s, size)| format!("{s}; response {size} bytes"))
                .unwrap_or_else(na)
        };
        println!(
            "ListVolumes ({} volumes), 1 client, TCP:  {}",
            g.volumes,
            list(&g.list_tcp)
        );
        println!(
            "ListVolumes ({} volumes), 1 client, Unix: {}",
            g.volumes,
            list(&g.list_unix)
        );
        for l in &g.load {
            println!("  {l}");
        }
    }
    if let Some(u) = &usage {
        println!(
            "-- usage refresh: {} directories, {} files ({}), concurrency {USAGE_CONCURRENCY}; tree built in {:.1} s --",
            u.dirs,
            u.files,
            u.fs,
            u.build.as_secs_f64()
        );
        for (i, r) in u.runs.iter().enumerate() {
            println!(
                "run {} ({}): {:.0} ms wall, {:.0} files/s ({:.0} entries/s), {} dirs measured, {} inodes, {:.1} MiB; peak RSS +{}; {}",
                i + 1,
                if i == 0 {
                    "right after creating the tree"
                } else {
                    "warm"
                },
                r.wall.as_secs_f64() * 1e3,
                u.files as f64 / r.wall.as_secs_f64(),
                r.inodes as f64 / r.wall.as_secs_f64(),
                r.measured,
                r.inodes,
                r.bytes as f64 / (1 << 20) as f64,
                r.peak_rss_delta
                    .map(|m| format!("{m:.1} MiB"))
                    .unwrap_or_else(na),
                r.cpu
            );
        }
    }
}
