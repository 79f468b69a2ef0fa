//! Child-process plumbing for the e2e harness.
//!
//! * Every child runs in its own process group and carries the environment marker
//!   `HOSTVOL_E2E_CLUSTER=<cluster dir>`, so the harness only ever signals processes it started.
//! * Children are spawned from one long-lived helper thread and get `PR_SET_PDEATHSIG=SIGKILL`:
//!   if the test process dies without running destructors (SIGKILL, timeout, Ctrl-C), the kernel
//!   kills etcd/apiserver/agents too. (The death signal fires when the *spawning thread* exits,
//!   which is why spawning happens on a thread that lives as long as the process.)
//! * `reap_stale()` cleans up directories (and processes) left behind by test processes that died.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub const MARKER_ENV: &str = "HOSTVOL_E2E_CLUSTER";
pub const DIR_PREFIX: &str = "hostvol-e2e-";
pub const OWNER_FILE: &str = "owner.pid";
pub const PIDS_FILE: &str = "pids";
pub const KEPT_FILE: &str = "KEPT";

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("hostvol-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn hostvol-e2e-spawner thread");
        Mutex::new(tx)
    })
}

/// Spawns `cmd` in its own process group, with the cluster marker in its environment, output
/// appended to `log`, and SIGKILL as parent-death signal.
pub fn spawn_logged(mut cmd: Command, cluster_dir: &Path, log: &Path) -> io::Result<Child> {
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .env(MARKER_ENV, cluster_dir)
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            // Async-signal-safe calls only.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1); // test process died between fork and prctl
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .expect("spawner thread gone");
    rx.recv().expect("spawner thread gone")
}

/// True if `pid` is alive and carries our marker for `cluster_dir` in its environment.
pub fn owned_by(pid: u32, cluster_dir: &Path) -> bool {
    let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut want: Vec<u8> = format!("{MARKER_ENV}=").into_bytes();
    want.extend_from_slice(cluster_dir.as_os_str().as_encoded_bytes());
    env.split(|b| *b == 0).any(|kv| kv == want.as_slice())
}

pub fn signal_group(pid: u32, sig: libc::c_int) {
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
        libc::kill(pid as libc::pid_t, sig);
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Pids of all processes started for one cluster (also recorded in `<dir>/pids`).
pub struct Registry {
    pub dir: PathBuf,
    pids: Mutex<Vec<(String, u32)>>,
}

impl Registry {
    pub fn new(dir: PathBuf) -> Self {
        let _ = fs::write(dir.join(OWNER_FILE), std::process::id().to_string());
        Registry {
            dir,
            pids: Mutex::new(Vec::new()),
        }
    }

    pub fn register(&self, name: &str, pid: u32) {
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), pid));
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(PIDS_FILE))
        {
            let _ = writeln!(f, "{pid} {name}");
        }
    }

    /// SIGKILLs every registered process that is still ours, newest first.
    pub fn kill_all(&self) {
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (_, pid) in pids.iter().rev() {
            if owned_by(*pid, &self.dir) {
                signal_group(*pid, libc::SIGKILL);
            }
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes leftovers of earlier test processes that died without cleaning up.
pub fn reap_stale(roots: &[PathBuf]) {
    for root in roots {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name: OsString = entry.file_name();
            if !name.to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let dir = entry.path();
            let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
                continue;
            };
            let Ok(owner) = owner.trim().parse::<u32>() else {
                continue;
            };
            if pid_alive(owner) {
                continue;
            }
            if let Ok(pids) = fs::read_to_string(dir.join(PIDS_FILE)) {
                for pid in pids
                    .lines()
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
                {
                    if owned_by(pid, &dir) {
                        signal_group(pid, libc::SIGKILL);
                    }
                }
            }
            if !dir.join(KEPT_FILE).exists() {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
}

/// Waits for `child` to exit for at most `timeout`; returns true if it exited.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) => {}
            Err(_) => return true,
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file (for panic messages).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

pub fn touch(path: &Path) {
    let _ = File::create(path);
}
