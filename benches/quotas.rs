//! Benchmark of issue #9's performance targets for enforced sizes (btrfs qgroups). It prints
//! figures; it asserts nothing about timing.
//!
//! Run: `cargo bench --bench quotas` as root with btrfs-progs installed (`scripts/test.sh` or
//! `apt-get install -y btrfs-progs`) and the control plane set up (`scripts/setup-control-plane.sh`).
//! Without root or the tools it prints why and exits with status 1.
//!
//! A. Provisioning with a quota backend: a real control plane (tests/common) and two real agents:
//!    node-a's data root is a loop-mounted btrfs with quotas on (`common::loop_btrfs`, mounted
//!    where the harness puts node-a's root), node-b's a plain directory on the host's filesystem (no
//!    quotas). N claims (default 200) of class `hostvol` (deploy/storageclass.yaml), each already
//!    carrying `volume.kubernetes.io/selected-node`, created one at a time, alternately for node-a
//!    and node-b (same run, same load). Figures per root: the agent's `millis=` of its
//!    "provisioned" log lines, its split at the debug line "volume directory ready", and the outside
//!    view (claim watch event with the PV controller's storage-provisioner annotation -> PV watch
//!    event). Target: median <= 15 ms, p99 <= 50 ms.
//! B. Usage from quotas: a fresh loop btrfs with quotas; V volumes (default 1,000) made with
//!    `VolumeStore::ensure_volume` (subvolume + 64 MiB limit), F files each (default 20, 1-16 KiB,
//!    top level and `data/`); one `btrfs::sync`; then R rounds (default 11) of `Quotas::usage` over
//!    all V names and of `usage::refresh` (the walk, concurrency 2 as the agent) over the same V
//!    volumes, alternately: medians. Target: `Quotas::usage` <= 10 ms in all. Also timed, to explain
//!    part A: `ensure_volume` per call while the 1,000 are made, its steps one by one, and
//!    mkdir + fsync on the host filesystem.
//!
//! Environment: `HOSTVOL_BENCH_SEQ` (200), `HOSTVOL_BENCH_QUOTA_VOLUMES` (1000),
//! `HOSTVOL_BENCH_QUOTA_FILES` (20), `HOSTVOL_BENCH_USAGE_RUNS` (11), `HOSTVOL_BENCH_ONLY`
//! (`provisioning` or `usage`: run one part), plus the harness's variables.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::loop_btrfs::{self, LoopBtrfs};
use common::usage::{self, UsageCache};
use common::{Agent, Cluster};
use hostvol::domain::params::ClassParameters;
use hostvol::domain::quota::QuotaMode;
use hostvol::node::quota::{Quotas, btrfs};
use hostvol::node::volume_store::VolumeStore;
use kube::api::{Api, PostParams};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use support::{
    AGENT_BIN, Recorder, Summary, agent_exe, build_kind, claim, cores, env_usize, loadavg,
    logged_millis, logged_split, ms, requested, runtime, start_watches, summarize_ms,
    summarize_ms_calls, summarize_us, us,
};

const MIB: u64 = 1 << 20;
/// Sparse images: only what btrfs writes takes space.
const IMAGE_A: u64 = 2048 * MIB;
const IMAGE_B: u64 = 4096 * MIB;
/// Part A's claims: small, so hundreds fit.
const SIZE: &str = "1Mi";
/// Part B's limit per volume.
const LIMIT: u64 = 64 * MIB;
/// The agent's default `--usage-concurrency`.
const USAGE_CONCURRENCY: usize = 2;
/// Volumes made step by step (part B) to split `ensure_volume`.
const PROBES: usize = 50;
const TARGET_STEP: &str = "target: median <= 15 ms, p99 <= 50 ms";
const TARGET_USAGE: &str = "target: <= 10 ms in all";

// ---------------------------------------------------------------------------------------------
// Part A: provisioning
// ---------------------------------------------------------------------------------------------

struct RootFigures {
    log: Summary,
    /// Claims whose logged step took more than 50 ms.
    over_50: usize,
    outside: Summary,
    before: Summary,
    post: Summary,
}

struct ProvisioningReport {
    n: usize,
    quota_enforcement: String,
    plain_enforcement: String,
    quota: RootFigures,
    plain: RootFigures,
    load_before: String,
    load_after: String,
    seconds: f64,
}

/// The agent's start-up lines about how its roots enforce sizes.
fn enforcement_lines(agent: &Agent) -> String {
    agent
        .log()
        .lines()
        .map(support::strip_ansi)
        .filter(|l| l.contains("sizes enforced") || l.contains("sizes not enforced"))
        .map(|l| {
            l.split_once("hostvol")
                .map(|(_, rest)| format!("hostvol{rest}"))
                .unwrap_or(l.clone())
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn root_figures(rec: &Recorder, agent: &Agent, ns: &str) -> RootFigures {
    let (before, post) = logged_split(agent, ns);
    let millis = logged_millis(agent, ns);
    RootFigures {
        over_50: millis.iter().filter(|&&m| m > 50.0).count(),
        log: summarize_ms(millis),
        outside: summarize_ms(rec.agent_steps(ns)),
        before: summarize_ms(before),
        post: summarize_ms(post),
    }
}

async fn provisioning_part(n: usize) -> ProvisioningReport {
    let started = Instant::now();
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    cluster.add_node("node-b").await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    // Where the harness puts node-a's data root (`Cluster::start_agent`), checked below.
    let fs = LoopBtrfs::create_sized(
        &cluster.dir().join("node-a-root"),
        loop_btrfs::Quotas::On,
        IMAGE_A,
    );
    let rec = Arc::new(Recorder::default());
    let watches = start_watches(cluster.client(), rec.clone()).await;
    let quota_agent = cluster.start_agent("node-a", &[]).await;
    assert_eq!(
        quota_agent.root,
        fs.mnt(),
        "the harness gave node-a a data root other than the btrfs mounted for it"
    );
    let plain_agent = cluster.start_agent("node-b", &[]).await;
    let quota_enforcement = enforcement_lines(&quota_agent);
    let plain_enforcement = enforcement_lines(&plain_agent);
    eprintln!(
        "[bench] agents run {} (pids {}, {}); node-a: {quota_enforcement}; node-b: {plain_enforcement}",
        agent_exe(&quota_agent),
        quota_agent.pid(),
        plain_agent.pid()
    );
    assert!(
        quota_enforcement.contains("btrfs-qgroup"),
        "node-a's agent must enforce sizes with btrfs-qgroup; its log says: {quota_enforcement:?}"
    );
    let roots = [("quota", &quota_agent), ("plain", &plain_agent)];
    for (ns, _) in roots {
        cluster.create_namespace(ns).await;
    }
    let load_before = loadavg();
    eprintln!(
        "[bench] part A: {n} claims per root, one at a time, alternating btrfs+quotas (node-a) and \
         plain directory (node-b); load {load_before}"
    );
    let t0 = Instant::now();
    let mut timeouts = 0;
    'claims: for i in 0..n {
        for (ns, agent) in roots {
            let name = format!("{ns}-{i}");
            let api: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
                Api::namespaced(cluster.client(), ns);
            api.create(
                &PostParams::default(),
                &claim(ns, &name, "hostvol", SIZE, Some(&agent.node)),
            )
            .await
            .unwrap_or_else(|e| panic!("create {ns}/{name}: {e}"));
            let key = (ns.to_string(), name.clone());
            if !rec
                .wait(Duration::from_secs(30), |s| s.pv.contains_key(&key))
                .await
            {
                timeouts += 1;
                eprintln!("[bench] no PV for {ns}/{name} within 30 s");
                if timeouts >= 3 {
                    eprintln!("[bench] giving up after 3 timeouts\n{}", cluster.diag());
                    break 'claims;
                }
            }
        }
        if (i + 1) % 50 == 0 {
            eprintln!(
                "[bench]   {} / {n} pairs after {:.1} s; load {}",
                i + 1,
                t0.elapsed().as_secs_f64(),
                loadavg()
            );
        }
    }
    // The last "provisioned" lines are written right after the PVs: give the logs a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quota = root_figures(&rec, &quota_agent, "quota");
    let plain = root_figures(&rec, &plain_agent, "plain");
    let load_after = loadavg();
    for (what, f) in [("btrfs + quotas", &quota), ("plain directory", &plain)] {
        eprintln!("[bench]   {what}: agent log millis=: {}", f.log);
        eprintln!("[bench]   {what}: outside view:      {}", f.outside);
        eprintln!(
            "[bench]   {what}: split: start -> volume ready {}; volume ready -> provisioned (POST PV) {}",
            f.before, f.post
        );
    }
    eprintln!(
        "[bench] agent logs: {} and {}",
        quota_agent.log_path().display(),
        plain_agent.log_path().display()
    );
    watches.iter().for_each(|w| w.abort());
    // Agents first (they hold the btrfs open), then the filesystem, then the cluster directory.
    drop(quota_agent);
    drop(plain_agent);
    drop(fs);
    drop(cluster);
    ProvisioningReport {
        n,
        quota_enforcement,
        plain_enforcement,
        quota,
        plain,
        load_before,
        load_after,
        seconds: started.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------
// Part B: usage from quotas vs the walk
// ---------------------------------------------------------------------------------------------

struct UsageReport {
    volumes: usize,
    files: usize,
    made: Summary,
    made_first: Summary,
    made_last: Summary,
    make_seconds: f64,
    write_seconds: f64,
    written: u64,
    sync_ms: f64,
    quota_runs: Vec<f64>,
    sync_quota_runs: Vec<f64>,
    walk_runs: Vec<f64>,
    quota_found: usize,
    walk_measured: usize,
    quota_bytes: u64,
    walk_bytes: u64,
    steps_empty: Steps,
    steps_full: Steps,
    host_mkdir_fsync: Summary,
    load_before: String,
    load_after: String,
}

/// `ensure_volume`'s steps, timed one by one, in microseconds.
struct Steps {
    qgroups: usize,
    create: Summary,
    chmod: Summary,
    limit: Summary,
    fsync: Summary,
    syncfs: Summary,
}

/// Volume names as the agent makes them (`pvc-<uid>_<namespace>_<claim>`).
fn volume_name(prefix: &str, i: usize) -> String {
    format!("pvc-{prefix}-{i:05}_bench_claim-{i}")
}

/// Makes `k` volumes step by step as `ensure_volume` does (create, open + chmod, limit,
/// fsync(root)), timing each step; then `k` syncfs calls.
fn time_steps(store: &VolumeStore, quotas: &Quotas, prefix: &str, k: usize) -> Steps {
    let root = store.root_handle();
    let (mut create, mut chmod, mut limit, mut fsync, mut syncfs) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..k {
        let name = volume_name(prefix, i);
        let t = Instant::now();
        assert!(quotas.create_volume(root.as_fd(), &name).expect("create"));
        create.push(us(t.elapsed()));
        let t = Instant::now();
        let dir = nix::fcntl::openat(
            root.as_fd(),
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open");
        nix::sys::stat::fchmod(dir.as_fd(), Mode::from_bits_truncate(0o777)).expect("chmod");
        chmod.push(us(t.elapsed()));
        let t = Instant::now();
        quotas
            .limit(root.as_fd(), &name, LIMIT)
            .expect("limit")
            .expect("a limit on btrfs with quotas");
        limit.push(us(t.elapsed()));
        let t = Instant::now();
        nix::unistd::fsync(root.as_fd()).expect("fsync");
        fsync.push(us(t.elapsed()));
    }
    for _ in 0..k {
        let t = Instant::now();
        btrfs::sync(root.as_fd()).expect("syncfs");
        syncfs.push(us(t.elapsed()));
    }
    Steps {
        qgroups: btrfs::qgroups(root.as_fd()).map(|q| q.len()).unwrap_or(0),
        create: summarize_us(create),
        chmod: summarize_us(chmod),
        limit: summarize_us(limit),
        fsync: summarize_us(fsync),
        syncfs: summarize_us(syncfs),
    }
}

/// `k` times mkdir + fsync(parent) in a temporary directory on the host's filesystem (where
/// part A's plain root is), in ms.
fn host_mkdir_fsync(k: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("temp dir");
    (0..k)
        .filter_map(|i| {
            let t = Instant::now();
            std::fs::create_dir(dir.path().join(i.to_string()))
                .and_then(|_| std::fs::File::open(dir.path())?.sync_all())
                .ok()
                .map(|_| ms(t.elapsed()))
        })
        .collect()
}

/// Writes `files` files (1-16 KiB; 40% at the top, the rest in `data/`) into each volume, on 2
/// threads; returns the bytes written.
fn write_files(root: &Path, names: &[String], files: usize) -> u64 {
    let payload = vec![0x5au8; 16 * 1024];
    let written = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for half in names.chunks(names.len().div_ceil(2).max(1)) {
            let (payload, written) = (&payload, &written);
            s.spawn(move || {
                let mut bytes = 0u64;
                for (k, name) in half.iter().enumerate() {
                    let dir = root.join(name);
                    std::fs::create_dir_all(dir.join("data")).expect("create data/");
                    for j in 0..files {
                        let path = if j < files * 4 / 10 {
                            dir.join(format!("f{j}"))
                        } else {
                            dir.join(format!("data/f{j}"))
                        };
                        let len = 1024 + (k * 131 + j * 977) % (15 * 1024);
                        std::fs::write(path, &payload[..len]).expect("write file");
                        bytes += len as u64;
                    }
                }
                written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    written.into_inner()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    support::pct(&v, 0.5)
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

async fn usage_part(volumes: usize, files: usize, runs: usize) -> UsageReport {
    let load_before = loadavg();
    let mnt = tempfile::Builder::new()
        .prefix("hostvol-bench-quotas-")
        .tempdir()
        .expect("mount point");
    let fs = LoopBtrfs::create_sized(mnt.path(), loop_btrfs::Quotas::On, IMAGE_B);
    let store = VolumeStore::open(fs.mnt()).expect("open the btrfs as a data root");
    let root: Arc<OwnedFd> = store.root_handle();
    let quotas = Quotas::detect(root.as_fd(), QuotaMode::Auto);
    assert!(
        quotas.uses_subvolumes(),
        "the loop btrfs must offer qgroups: {:?}",
        quotas.enforcement
    );
    eprintln!(
        "[bench] part B: {volumes} volumes x {files} files on a loop btrfs with quotas at {}; load {load_before}",
        fs.mnt().display()
    );

    let steps_empty =
        tokio::task::block_in_place(|| time_steps(&store, &quotas, "probe-a", PROBES));
    let names: Vec<String> = (0..volumes).map(|i| volume_name("bench", i)).collect();
    let params = ClassParameters::default();
    let t0 = Instant::now();
    let made: Vec<f64> = tokio::task::block_in_place(|| {
        names
            .iter()
            .map(|name| {
                let t = Instant::now();
                store
                    .ensure_volume(name, &params, &quotas, LIMIT)
                    .unwrap_or_else(|e| panic!("ensure_volume {name}: {e}"));
                ms(t.elapsed())
            })
            .collect()
    });
    let make_seconds = t0.elapsed().as_secs_f64();
    let tenth = (volumes / 10).max(1).min(made.len());
    let made_first = summarize_ms_calls(made[..tenth].to_vec());
    let made_last = summarize_ms_calls(made[made.len() - tenth..].to_vec());
    let made = summarize_ms_calls(made);
    eprintln!(
        "[bench]   made {volumes} volumes with ensure_volume in {make_seconds:.1} s: {made} (first tenth {made_first}; last tenth {made_last})"
    );
    let steps_full = tokio::task::block_in_place(|| time_steps(&store, &quotas, "probe-b", PROBES));

    let t0 = Instant::now();
    let written = tokio::task::block_in_place(|| write_files(fs.mnt(), &names, files));
    let write_seconds = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    btrfs::sync(root.as_fd()).expect("syncfs");
    let sync_ms = ms(t.elapsed());
    eprintln!(
        "[bench]   wrote {} files ({:.1} MiB) in {write_seconds:.1} s; btrfs::sync {sync_ms:.1} ms; load {}",
        volumes * files,
        written as f64 / MIB as f64,
        loadavg()
    );

    let (mut quota_runs, mut sync_quota_runs, mut walk_runs) = (vec![], vec![], vec![]);
    let (mut quota_found, mut walk_measured, mut quota_bytes, mut walk_bytes) = (0, 0, 0, 0);
    for run in 0..runs {
        let t = Instant::now();
        let figures = quotas
            .usage(root.as_fd(), &names)
            .expect("Quotas::usage")
            .expect("figures on a root with quotas");
        quota_runs.push(ms(t.elapsed()));
        quota_found = figures.len();
        quota_bytes = figures.values().map(|u| u.used_bytes).sum();

        // As the agent's refresh does it: commit first, then read.
        let t = Instant::now();
        btrfs::sync(root.as_fd()).expect("syncfs");
        let figures = quotas.usage(root.as_fd(), &names).expect("usage").unwrap();
        sync_quota_runs.push(ms(t.elapsed()));
        assert_eq!(figures.len(), quota_found);

        let cache = UsageCache::default();
        let (measured, wall) = usage::refresh(
            "default",
            root.clone(),
            names.clone(),
            &cache,
            USAGE_CONCURRENCY,
        )
        .await;
        walk_runs.push(ms(wall));
        walk_measured = measured;
        walk_bytes = names
            .iter()
            .filter_map(|n| cache.get("default", n))
            .map(|u| u.bytes)
            .sum();
        eprintln!(
            "[bench]   round {}: Quotas::usage {:.2} ms ({quota_found} volumes, {:.1} MiB); sync + usage {:.2} ms; walk {:.1} ms ({walk_measured} volumes, {:.1} MiB); load {}",
            run + 1,
            quota_runs[run],
            quota_bytes as f64 / MIB as f64,
            sync_quota_runs[run],
            walk_runs[run],
            walk_bytes as f64 / MIB as f64,
            loadavg()
        );
    }
    let host_mkdir_fsync =
        summarize_ms_calls(tokio::task::block_in_place(|| host_mkdir_fsync(PROBES)));
    let load_after = loadavg();
    drop(root);
    drop(store);
    drop(fs);
    drop(mnt);
    UsageReport {
        volumes,
        files,
        made,
        made_first,
        made_last,
        make_seconds,
        write_seconds,
        written,
        sync_ms,
        quota_runs,
        sync_quota_runs,
        walk_runs,
        quota_found,
        walk_measured,
        quota_bytes,
        walk_bytes,
        steps_empty,
        steps_full,
        host_mkdir_fsync,
        load_before,
        load_after,
    }
}

// ---------------------------------------------------------------------------------------------

fn verdict(s: &Summary) -> &'static str {
    if s.median <= 15.0 && s.p99 <= 50.0 {
        "met"
    } else {
        "MISSED"
    }
}

fn print_steps(label: &str, s: &Steps) {
    println!(
        "ensure_volume steps, {label} ({} qgroups after):",
        s.qgroups
    );
    println!("  create subvolume (ioctl):       {}", s.create);
    println!("  open + fchmod:                  {}", s.chmod);
    println!("  limit (open, QGROUP_LIMIT, id): {}", s.limit);
    println!("  fsync(root):                    {}", s.fsync);
    println!("  syncfs, nothing new to commit:  {}", s.syncfs);
}

fn main() {
    // Without `--bench` (`cargo test --benches`), skip the minutes-long run.
    if !requested("quotas") {
        return;
    }
    if let Some(why) = loop_btrfs::missing_requirements() {
        eprintln!("quotas benchmark: cannot run: {why}");
        println!("quotas benchmark: cannot run: {why}");
        std::process::exit(1);
    }
    let seq_n = env_usize("HOSTVOL_BENCH_SEQ", 200);
    let volumes = env_usize("HOSTVOL_BENCH_QUOTA_VOLUMES", 1000);
    let files = env_usize("HOSTVOL_BENCH_QUOTA_FILES", 20);
    let runs = env_usize("HOSTVOL_BENCH_USAGE_RUNS", 11).max(1);
    let only = std::env::var("HOSTVOL_BENCH_ONLY").unwrap_or_default();
    let (do_prov, do_usage) = match only.as_str() {
        "provisioning" => (true, false),
        "usage" => (false, true),
        _ => (true, true),
    };
    eprintln!("[bench] agent binary {AGENT_BIN} ({} build)", build_kind());
    let load_start = loadavg();
    let started = Instant::now();
    let rt = runtime();
    let (prov, use_) = rt.block_on(async {
        let prov = if do_prov && seq_n > 0 {
            Some(provisioning_part(seq_n).await)
        } else {
            None
        };
        let use_ = if do_usage && volumes > 0 {
            Some(usage_part(volumes, files, runs).await)
        } else {
            None
        };
        (prov, use_)
    });
    rt.shutdown_timeout(Duration::from_secs(2));

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!();
    println!(
        "hostvol quotas benchmark ({} cores, kernel {}, Kubernetes {}, {} build; load avg {load_start} at start, {} at end; {:.0} s)",
        cores(),
        kernel.trim(),
        common::K8S_VERSION,
        build_kind(),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!("agent binary: {AGENT_BIN}");
    if let Some(p) = &prov {
        println!(
            "-- A. provisioning, {} claims per root, one at a time, alternating roots ({:.0} s; load {} before, {} after) --",
            p.n, p.seconds, p.load_before, p.load_after
        );
        println!("node-a (loop btrfs, quotas on): {}", p.quota_enforcement);
        println!("node-b (plain directory, ext4): {}", p.plain_enforcement);
        for (what, f) in [("btrfs + quotas ", &p.quota), ("plain directory", &p.plain)] {
            println!(
                "agent step, {what}, agent log millis=: {}; {} over 50 ms   [{TARGET_STEP}: {}]",
                f.log,
                f.over_50,
                verdict(&f.log)
            );
            println!(
                "agent step, {what}, outside view (annotation -> PV watch event): {}   [{}]",
                f.outside,
                verdict(&f.outside)
            );
            println!(
                "  split, {what}: start -> volume ready (GET claim, GET PV, lock, statvfs, make volume, fsync): {}",
                f.before
            );
            println!(
                "  split, {what}: volume ready -> provisioned (POST PV): {}",
                f.post
            );
        }
    }
    if let Some(u) = &use_ {
        println!(
            "-- B. usage of {} volumes ({} files each, {:.1} MiB written in {:.1} s), loop btrfs with quotas; load {} before, {} after --",
            u.volumes,
            u.files,
            u.written as f64 / MIB as f64,
            u.write_seconds,
            u.load_before,
            u.load_after
        );
        let (qlo, qhi) = min_max(&u.quota_runs);
        let (slo, shi) = min_max(&u.sync_quota_runs);
        let (wlo, whi) = min_max(&u.walk_runs);
        let q = median(&u.quota_runs);
        let w = median(&u.walk_runs);
        println!(
            "Quotas::usage over {} names: median {q:.2} ms (min {qlo:.2}, max {qhi:.2}; {} rounds), {} volumes found, {:.1} MiB referenced   [{TARGET_USAGE}: {}]",
            u.volumes,
            u.quota_runs.len(),
            u.quota_found,
            u.quota_bytes as f64 / MIB as f64,
            if q <= 10.0 { "met" } else { "MISSED" }
        );
        println!(
            "btrfs::sync + Quotas::usage (the agent's refresh): median {:.2} ms (min {slo:.2}, max {shi:.2})",
            median(&u.sync_quota_runs)
        );
        println!(
            "walk, usage::refresh over the same {} volumes (concurrency {USAGE_CONCURRENCY}): median {w:.1} ms (min {wlo:.1}, max {whi:.1}), {} measured, {:.1} MiB allocated; quotas {:.0}x faster",
            u.volumes,
            u.walk_measured,
            u.walk_bytes as f64 / MIB as f64,
            w / q
        );
        println!("first btrfs::sync after writing: {:.1} ms", u.sync_ms);
        println!(
            "ensure_volume (subvolume, chmod, 64 MiB limit, fsync) in-process, {} volumes in {:.1} s: {}",
            u.volumes, u.make_seconds, u.made
        );
        println!("  first tenth: {}", u.made_first);
        println!("  last tenth:  {}", u.made_last);
        print_steps("empty filesystem", &u.steps_empty);
        print_steps("after the volumes", &u.steps_full);
        println!(
            "host filesystem (plain root's), mkdir + fsync(parent): {}",
            u.host_mkdir_fsync
        );
    }
}
