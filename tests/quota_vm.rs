//! XFS and ext4 project quotas, tested against the real filesystems inside a small QEMU VM.
//!
//! This machine's kernel may have neither XFS quotas nor ext4's quota format, so the outer test
//! [`quota_vm`] boots Debian's stock kernel under QEMU's TCG emulation (no KVM needed) with an
//! initramfs holding *this test binary* (stripped, with its `ldd` library closure), busybox-static,
//! the kernel modules and `tests/quota_vm/init.sh`. Three disk images are made on the host (XFS,
//! ext4 with the quota and project features, ext4 without). Inside the VM, `/init` mounts them and
//! runs this binary again as `--exact quota_vm` with
//! `HOSTVOL_IN_QUOTA_VM=<mode>:<mount point>`, so [`inner_quota_checks`] runs against a real
//! filesystem. Results come back through a 9p share: the outer test passes only when QEMU exits 0
//! and the result file says every mode passed; otherwise it prints the VM's logs.
//!
//! The kernel, modules and busybox come from a cache that `scripts/setup-quota-vm.sh` fills (once;
//! later runs are instant); without it the test fails, naming that script.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostvol::domain::params::ClassParameters;
use hostvol::domain::quota::{Enforcement, Mechanism, QuotaMode};
use hostvol::node::clone::{Method, copy_into};
use hostvol::node::quota::project::{
    Filesystem, PROJECT_ID_MAX, ProjectQuotaState, allocation_stats, assign_new_project, detect,
    enforcement, project_of, random_start, set_limit, set_project, usage,
};
use hostvol::node::quota::{Limit, Quotas, Removed};
use hostvol::node::volume_store::{Outcome, VolumeStore};

/// Set inside the VM: `<mode>:<mount point>`.
const ENV_MODE: &str = "HOSTVOL_IN_QUOTA_VM";
/// Set inside the VM: the file on the 9p share where a passing inner test appends `PASS <mode>`.
const ENV_RESULT: &str = "HOSTVOL_QUOTA_VM_RESULT";
/// The name libtest knows the inner test by (it is at the top level of this file).
const INNER_TEST: &str = "quota_vm";
/// What `/init` runs, in this order; each must report `PASS` and exit 0.
const MODES: [&str; 5] = [
    "xfs",
    "ext4",
    "xfs-noquota",
    "ext4-noprjquota",
    "ext4-plain",
];
const INIT_SCRIPT: &str = include_str!("quota_vm/init.sh");
const SETUP_SCRIPT: &str = "scripts/setup-quota-vm.sh";
/// Upper bound for one VM run (it takes well under a minute on TCG).
const VM_TIMEOUT: Duration = Duration::from_secs(600);

const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;

// ================================================================================================
// Outer test: runs on the host, builds the VM and boots it.
// ================================================================================================

#[test]
fn quota_vm() {
    // The same test binary runs inside the VM, where it does the checks instead of booting one.
    if let Some(spec) = std::env::var_os(ENV_MODE) {
        return inner_quota_checks(spec.to_str().unwrap());
    }
    let started = Instant::now();
    let kernel_dir = kernel_cache();
    let tools = HostTools::find();

    let work =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("quota-vm-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let share = work.join("share");
    fs::create_dir_all(&share).unwrap();

    let t = Instant::now();
    let initramfs = work.join("initramfs.cpio");
    build_initramfs(&kernel_dir, &tools, &work, &initramfs);
    let initramfs_time = t.elapsed();

    let t = Instant::now();
    let disks = [
        make_disk(&work, "xfs.img", 320 * MIB, &tools.mkfs_xfs, &["-q", "-f"]),
        make_disk(
            &work,
            "ext4.img",
            128 * MIB,
            &tools.mkfs_ext4,
            &[
                "-q",
                "-F",
                "-b",
                "4096",
                "-O",
                "quota,project",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
            ],
        ),
        make_disk(
            &work,
            "ext4-plain.img",
            32 * MIB,
            &tools.mkfs_ext4,
            &[
                "-q",
                "-F",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
            ],
        ),
    ];
    let mkfs_time = t.elapsed();

    let t = Instant::now();
    let serial = work.join("serial.log");
    let mut cmd = Command::new(&tools.qemu);
    cmd.args([
        "-accel", "tcg", "-cpu", "max", "-M", "pc", "-smp", "2", "-m", "256M",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel_image(&kernel_dir))
    .arg("-initrd")
    .arg(&initramfs)
    .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/init"])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()));
    for d in &disks {
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            d.display()
        ));
    }
    cmd.arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=results,security_model=none,id=results",
            share.display()
        ))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(work.join("qemu.stderr")).unwrap()));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", tools.qemu.display()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if t.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let vm_time = t.elapsed();

    let result = fs::read_to_string(share.join("result")).unwrap_or_default();
    let mut problems = Vec::new();
    match status {
        None => problems.push(format!("QEMU did not finish within {VM_TIMEOUT:?}")),
        Some(s) if !s.success() => problems.push(format!(
            "QEMU exited with {s} (3 means /init reported a failure)"
        )),
        Some(_) => {}
    }
    let lines: Vec<&str> = result.lines().collect();
    for mode in MODES {
        if !lines.contains(&format!("PASS {mode}").as_str()) {
            problems.push(format!("mode {mode}: no PASS line"));
        }
        if !lines.contains(&format!("EXIT {mode} 0").as_str()) {
            problems.push(format!("mode {mode}: no `EXIT {mode} 0` line"));
        }
    }
    if !lines.contains(&"DONE") {
        problems.push("/init did not finish (no DONE line)".into());
    }
    eprintln!(
        "quota VM: initramfs {:.1}s ({} MiB), mkfs {:.1}s, VM {:.1}s, whole test {:.1}s",
        initramfs_time.as_secs_f64(),
        fs::metadata(&initramfs).map(|m| m.len() / MIB).unwrap_or(0),
        mkfs_time.as_secs_f64(),
        vm_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if problems.is_empty() {
        // What the inner checks found (seen with --nocapture).
        for mode in MODES {
            let log = fs::read_to_string(share.join(format!("{mode}.log"))).unwrap_or_default();
            for l in log
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with("running ") && !l.starts_with("test "))
            {
                eprintln!("  {mode}: {l}");
            }
        }
        eprintln!("{}", fs::read_to_string(&serial).unwrap_or_default());
        if std::env::var_os("HOSTVOL_QUOTA_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&work);
        }
        return;
    }
    let mut report = format!("quota VM test failed:\n  - {}\n", problems.join("\n  - "));
    report += &format!("\n===== result file =====\n{result}");
    for (name, path) in [
        ("serial console", serial.clone()),
        ("qemu stderr", work.join("qemu.stderr")),
    ] {
        report += &format!(
            "\n===== {name} =====\n{}",
            fs::read_to_string(&path).unwrap_or_default()
        );
    }
    for mode in MODES {
        if let Ok(log) = fs::read_to_string(share.join(format!("{mode}.log"))) {
            report += &format!("\n===== {mode}.log =====\n{log}");
        }
    }
    report += &format!("\n(work directory kept: {})", work.display());
    panic!("{report}");
}

/// `<cache>/quota-vm/<kernel version>/`, as `scripts/setup-quota-vm.sh` leaves it.
fn kernel_cache() -> PathBuf {
    let root = if let Some(d) = std::env::var_os("HOSTVOL_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("hostvol")
    } else {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(".cache/hostvol")
    }
    .join("quota-vm");
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join(SETUP_SCRIPT);
    let missing = |what: String| -> ! {
        panic!(
            "the quota VM's kernel cache is missing ({what}): run `{}` (as root; it installs QEMU, \
             busybox-static, xfsprogs and e2fsprogs from Debian and caches Debian's kernel), then \
             run this test again",
            setup.display()
        )
    };
    let current = root.join("current");
    let Ok(version) = fs::read_to_string(&current) else {
        missing(format!("no {}", current.display()))
    };
    let dir = root.join(version.trim());
    for f in ["complete", "vmlinuz", "modules.load", "busybox"] {
        if !dir.join(f).is_file() {
            missing(format!("no {}", dir.join(f).display()));
        }
    }
    dir
}

/// The uncompressed PVH kernel where the setup script could extract it (QEMU boots it directly,
/// ~6 s faster on TCG than letting the bzImage decompress itself), else the bzImage.
fn kernel_image(kernel_dir: &Path) -> PathBuf {
    let vmlinux = kernel_dir.join("vmlinux");
    if vmlinux.is_file() {
        vmlinux
    } else {
        kernel_dir.join("vmlinuz")
    }
}

struct HostTools {
    qemu: PathBuf,
    mkfs_xfs: PathBuf,
    mkfs_ext4: PathBuf,
    objcopy: PathBuf,
    ldd: PathBuf,
}

impl HostTools {
    fn find() -> HostTools {
        let mut missing = Vec::new();
        let mut find = |name: &str| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs = std::env::split_paths(&path)
                .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
            for d in dirs {
                let p = d.join(name);
                if p.is_file() {
                    return p;
                }
            }
            missing.push(name.to_string());
            PathBuf::new()
        };
        let tools = HostTools {
            qemu: find("qemu-system-x86_64"),
            mkfs_xfs: find("mkfs.xfs"),
            mkfs_ext4: find("mkfs.ext4"),
            objcopy: find("objcopy"),
            ldd: find("ldd"),
        };
        if !missing.is_empty() {
            panic!(
                "the quota VM test needs {} on this host: run `{}` (as root)",
                missing.join(", "),
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(SETUP_SCRIPT)
                    .display()
            );
        }
        tools
    }
}

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_disk(work: &Path, name: &str, size: u64, mkfs: &Path, args: &[&str]) -> PathBuf {
    let path = work.join(name);
    File::create(&path).unwrap().set_len(size).unwrap(); // sparse
    run_tool(Command::new(mkfs).args(args).arg(&path));
    path
}

/// The shared libraries `binary` loads, as absolute paths (the dynamic loader included).
fn library_closure(ldd: &Path, binary: &Path) -> Vec<PathBuf> {
    let out = run_tool(Command::new(ldd).arg(binary));
    let mut libs = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs
}

fn build_initramfs(kernel_dir: &Path, tools: &HostTools, work: &Path, out: &Path) {
    let exe = std::env::current_exe().unwrap();
    let stripped = work.join("quota-vm-test");
    run_tool(
        Command::new(&tools.objcopy)
            .arg("--strip-debug")
            .arg(&exe)
            .arg(&stripped),
    );
    let libs = library_closure(&tools.ldd, &stripped);
    assert!(
        !libs.is_empty(),
        "ldd found no libraries for {}",
        stripped.display()
    );

    let mut cpio = Cpio::default();
    for d in [
        "/bin", "/dev", "/proc", "/sys", "/tmp", "/mnt", "/results", "/modules",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("/dev/console", 5, 1);
    cpio.file("/init", INIT_SCRIPT.as_bytes(), 0o755);
    cpio.file(
        "/bin/busybox",
        &fs::read(kernel_dir.join("busybox")).unwrap(),
        0o755,
    );
    cpio.file("/quota-vm-test", &fs::read(&stripped).unwrap(), 0o755);
    let mut lib_dirs = Vec::new();
    for lib in &libs {
        let dir = lib.parent().unwrap().to_str().unwrap().to_string();
        cpio.dir_all(&dir);
        if !lib_dirs.contains(&dir) {
            lib_dirs.push(dir);
        }
        cpio.file(lib.to_str().unwrap(), &fs::read(lib).unwrap(), 0o755);
    }
    let load = fs::read_to_string(kernel_dir.join("modules.load")).unwrap();
    for m in load.lines().filter(|l| !l.is_empty()) {
        cpio.file(
            &format!("/modules/{m}"),
            &fs::read(kernel_dir.join("modules").join(m)).unwrap(),
            0o644,
        );
    }
    cpio.file("/modules.load", load.as_bytes(), 0o644);
    let conf = format!(
        "TEST_BIN=/quota-vm-test\nINNER_TEST={INNER_TEST}\nLD_LIBRARY_PATH={}\n",
        lib_dirs.join(":")
    );
    cpio.file("/quota-vm.conf", conf.as_bytes(), 0o644);
    fs::write(out, cpio.finish()).unwrap();
}

/// An uncompressed initramfs in the "newc" cpio format (the kernel needs no decompressor, which
/// would be slow under TCG).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: Vec<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        if !self.dirs.iter().any(|d| d == path) {
            self.dirs.push(path.to_string());
            self.entry(path, 0o040755, &[], (0, 0));
        }
    }

    fn dir_all(&mut self, path: &str) {
        let mut sofar = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            sofar.push('/');
            sofar.push_str(part);
            self.dir(&sofar);
        }
    }

    fn file(&mut self, path: &str, data: &[u8], perm: u32) {
        self.entry(path, 0o100000 | perm, data, (0, 0));
    }

    fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020600, &[], (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

// ================================================================================================
// Inner test: runs inside the VM against a mounted filesystem.
// ================================================================================================

/// The checks `quota_vm` runs inside the VM, on the filesystem `spec` (`<mode>:<mount point>`) names.
fn inner_quota_checks(spec: &str) {
    let (mode, mount) = spec
        .split_once(':')
        .expect("HOSTVOL_IN_QUOTA_VM=<mode>:<mount point>");
    let mount = Path::new(mount);
    let root = File::open(mount).unwrap();
    let fs_fd = root.as_fd();
    eprintln!(
        "{mode}: kernel {}, checks on {}",
        uname_release(),
        mount.display()
    );

    // The initramfs is neither XFS nor ext4.
    let slash = File::open("/").unwrap();
    assert_eq!(detect(slash.as_fd()).unwrap(), None);
    let state = enforcement(slash.as_fd()).unwrap();
    assert!(matches!(state, ProjectQuotaState::Off { .. }), "{state:?}");
    let q = Quotas::detect(slash.as_fd(), QuotaMode::Auto);
    assert!(
        matches!(&q.enforcement, Enforcement::Unlimited { .. }),
        "{q:?}"
    );

    match mode {
        "xfs" | "ext4" => {
            let fs = if mode == "xfs" {
                Filesystem::Xfs
            } else {
                Filesystem::Ext4
            };
            assert_eq!(detect(fs_fd).unwrap(), Some(fs));
            assert_eq!(enforcement(fs_fd).unwrap(), ProjectQuotaState::Enforced);
            check_inheritance(mount, fs_fd);
            check_limits(fs, mount, fs_fd);
            check_concurrent_processes(mount, fs_fd);
            check_concurrent_threads(mount, fs_fd);
            check_facade(fs, mount, fs_fd);
            let stats = allocation_stats();
            println!(
                "summary: all checks passed; this process assigned {} ids, skipped {} in use, \
                 retreated from {} collisions",
                stats.assigned, stats.skipped_in_use, stats.collisions
            );
        }
        "xfs-noquota" => {
            assert_eq!(detect(fs_fd).unwrap(), Some(Filesystem::Xfs));
            let state = enforcement(fs_fd).unwrap();
            println!("state: {state}");
            let ProjectQuotaState::Off { hint } = &state else {
                panic!("expected off, got {state:?}")
            };
            assert!(
                hint.contains("-o prjquota") && hint.contains("XFS"),
                "{hint}"
            );
            let dir = fresh_dir(mount, "noquota");
            let e = assign_new_project(fs_fd, dir.as_fd(), random_start()).unwrap_err();
            println!("assign_new_project with quotas off: {e}");
            let e = set_limit(fs_fd, 1_000_000, Some(MIB)).unwrap_err();
            println!("set_limit with quotas off: {e}");
            assert_eq!(project_of(dir.as_fd()).unwrap().0, 0);
            fs::remove_dir(mount.join("noquota")).unwrap();
            check_facade_unlimited(mount, fs_fd, &["-o prjquota", "XFS"]);
            println!("summary: off state and hint ok");
        }
        "ext4-noprjquota" => {
            assert_eq!(detect(fs_fd).unwrap(), Some(Filesystem::Ext4));
            let state = enforcement(fs_fd).unwrap();
            println!("state: {state}");
            let ProjectQuotaState::AccountingOnly { hint } = &state else {
                panic!("expected accounting only, got {state:?}")
            };
            assert!(hint.contains("-o prjquota"), "{hint}");
            // Accounting alone is enough to allocate ids.
            let dir = fresh_dir(mount, "accounting");
            let id = assign_new_project(fs_fd, dir.as_fd(), random_start()).unwrap();
            assert_eq!(project_of(dir.as_fd()).unwrap(), (id, true));
            assert_eq!(usage(fs_fd, id).unwrap().inodes, 1);
            drop(dir); // an open directory stays counted
            fs::remove_dir(mount.join("accounting")).unwrap();
            assert_eq!(usage(fs_fd, id).unwrap().inodes, 0);
            check_facade_unlimited(mount, fs_fd, &["-o prjquota", "not enforced"]);
            println!("summary: accounting-only state, hint and allocation ok");
        }
        "ext4-plain" => {
            assert_eq!(detect(fs_fd).unwrap(), Some(Filesystem::Ext4));
            let state = enforcement(fs_fd).unwrap();
            println!("state: {state}");
            let ProjectQuotaState::Off { hint } = &state else {
                panic!("expected off, got {state:?}")
            };
            for needle in [
                "mkfs.ext4 -O quota,project",
                "tune2fs -O project,quota",
                "-o prjquota",
            ] {
                assert!(hint.contains(needle), "hint lacks {needle:?}: {hint}");
            }
            check_facade_unlimited(mount, fs_fd, &["mkfs.ext4 -O quota,project", "-o prjquota"]);
            println!("summary: off state and hint ok");
        }
        other => panic!("unknown mode {other}"),
    }

    let result = std::env::var(ENV_RESULT).expect("HOSTVOL_QUOTA_VM_RESULT");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(result)
        .unwrap();
    writeln!(f, "PASS {mode}").unwrap();
}

fn uname_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A new, empty directory `name` under `mount`, opened.
fn fresh_dir(mount: &Path, name: &str) -> File {
    let path = mount.join(name);
    let _ = fs::remove_dir_all(&path);
    fs::create_dir(&path).unwrap();
    File::open(&path).unwrap()
}

fn project_at(path: &Path) -> (u32, bool) {
    project_of(File::open(path).unwrap().as_fd()).unwrap()
}

/// The id is unused: nothing counted, no limit. XFS (since 5.19) inactivates unlinked inodes in
/// the background, so their count may linger a moment after the removal: wait for it.
fn assert_unused(fs_fd: BorrowedFd<'_>, id: u32) {
    let t = Instant::now();
    for round in 0.. {
        let u = usage(fs_fd, id).unwrap();
        if (u.inodes, u.limit_bytes) == (0, None) {
            if round > 0 {
                println!("project {id}: counted {:?} after the removal", t.elapsed());
            }
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "project {id} still in use: {u:?}"
        );
        nix::unistd::syncfs(fs_fd).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_inheritance(mount: &Path, fs_fd: BorrowedFd<'_>) {
    let vol = mount.join("inherit");
    let dir = fresh_dir(mount, "inherit");
    let id = assign_new_project(fs_fd, dir.as_fd(), random_start()).unwrap();
    assert_eq!(project_of(dir.as_fd()).unwrap(), (id, true));
    assert_eq!(usage(fs_fd, id).unwrap().inodes, 1);

    fs::write(vol.join("file"), b"hello").unwrap();
    fs::create_dir(vol.join("sub")).unwrap();
    fs::write(vol.join("sub/file"), b"hello").unwrap();
    fs::create_dir(vol.join("sub/subsub")).unwrap();
    assert_eq!(project_at(&vol.join("file")).0, id);
    assert_eq!(project_at(&vol.join("sub")), (id, true));
    assert_eq!(project_at(&vol.join("sub/file")).0, id);
    assert_eq!(project_at(&vol.join("sub/subsub")), (id, true));
    assert_eq!(usage(fs_fd, id).unwrap().inodes, 5);
    let e = assign_new_project(fs_fd, dir.as_fd(), random_start()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::DirectoryNotEmpty, "{e}");
    assert_eq!(project_of(dir.as_fd()).unwrap(), (id, true));

    // A file of another project cannot be renamed in.
    let outside = mount.join("outside");
    fs::write(&outside, b"x").unwrap();
    let e = fs::rename(&outside, vol.join("moved")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
    fs::remove_file(&outside).unwrap();

    // set_project on an existing directory (the id of an existing volume, e.g. re-applied).
    let other = fresh_dir(mount, "inherit-other");
    set_project(other.as_fd(), id).unwrap();
    assert_eq!(project_of(other.as_fd()).unwrap(), (id, true));
    assert_eq!(usage(fs_fd, id).unwrap().inodes, 6);

    drop((dir, other)); // open directories stay counted until closed
    fs::remove_dir_all(&vol).unwrap();
    fs::remove_dir(mount.join("inherit-other")).unwrap();
    assert_unused(fs_fd, id);
    println!("inheritance: project {id} on dir, files and subdirs; EXDEV on rename in: ok");
}

fn statfs_size(path: &Path) -> (u64, u64) {
    let st = nix::sys::statfs::statfs(path).unwrap();
    let bsize = st.block_size() as u64;
    (st.blocks() * bsize, st.blocks_available() * bsize)
}

/// What the kubelet reports for a `local` volume at `path` (its statfs metrics provider):
/// `kubelet_volume_stats_capacity_bytes` (blocks) and `_used_bytes` (blocks - free).
fn kubelet_volume_stats(path: &Path) -> (u64, u64) {
    let st = nix::sys::statfs::statfs(path).unwrap();
    let bsize = st.block_size() as u64;
    (
        st.blocks() * bsize,
        (st.blocks() - st.blocks_free()) * bsize,
    )
}

fn check_limits(fs: Filesystem, mount: &Path, fs_fd: BorrowedFd<'_>) {
    let limit_errno = match fs {
        Filesystem::Xfs => libc::ENOSPC,
        Filesystem::Ext4 => libc::EDQUOT,
    };
    let vol = mount.join("vol");
    let dir = fresh_dir(mount, "vol");
    fs::set_permissions(&vol, fs::Permissions::from_mode(0o777)).unwrap();
    let id = assign_new_project(fs_fd, dir.as_fd(), random_start()).unwrap();

    // Provision: 10 MiB.
    set_limit(fs_fd, id, Some(10 * MIB)).unwrap();
    assert_eq!(usage(fs_fd, id).unwrap().limit_bytes, Some(10 * MIB));
    let (size, avail) = statfs_size(&vol);
    assert_eq!(
        size,
        10 * MIB,
        "statfs inside the volume reports its limit as the size"
    );
    assert!((9 * MIB..=10 * MIB).contains(&avail), "avail {avail}");
    let (capacity, used) = kubelet_volume_stats(&vol);
    println!(
        "kubelet_volume_stats of a fresh local PV here: capacity {capacity} bytes, used {used} bytes"
    );
    assert_eq!(
        (capacity, used < MIB),
        (10 * MIB, true),
        "a fresh volume's own figures"
    );

    let data = vol.join("data");
    let w1 = write_as(Some(NOBODY), &data, 40 * MIB);
    println!(
        "as uid {NOBODY}: wrote {} bytes under a 10 MiB limit, then errno {}",
        w1.written, w1.errno
    );
    assert_eq!(w1.errno, limit_errno, "writing past the limit: {w1:?}");
    assert_eq!(
        (w1.uid, w1.cap_eff, w1.cap_prm),
        (NOBODY as u64, 0, 0),
        "privileges not dropped: {w1:?}"
    );
    assert!(w1.written >= 9 * MIB && w1.written <= 10 * MIB, "{w1:?}");
    let u = usage(fs_fd, id).unwrap();
    println!("usage after the first write: {u:?}");
    assert!(
        u.used_bytes >= w1.written && u.used_bytes <= w1.written + 256 * 1024,
        "usage {} vs {} bytes written",
        u.used_bytes,
        w1.written
    );
    assert_eq!(u.inodes, 2);
    // A `local` PV of this volume: the kubelet's figures are the volume's, not the filesystem's.
    let (capacity, used) = kubelet_volume_stats(&vol);
    println!(
        "kubelet_volume_stats of a local PV here: capacity {capacity} bytes, used {used} bytes (quota usage {})",
        u.used_bytes
    );
    assert_eq!(capacity, 10 * MIB, "capacity_bytes is the limit");
    assert!(
        used.abs_diff(u.used_bytes) <= 256 * 1024,
        "used_bytes {used} is the project's usage {}",
        u.used_bytes
    );

    // Expand: 30 MiB.
    set_limit(fs_fd, id, Some(30 * MIB)).unwrap();
    assert_eq!(usage(fs_fd, id).unwrap().limit_bytes, Some(30 * MIB));
    assert_eq!(statfs_size(&vol).0, 30 * MIB);
    let w2 = write_as(Some(NOBODY), &data, 40 * MIB);
    let total = w1.written + w2.written;
    println!(
        "after expansion to 30 MiB: wrote {} more bytes ({total} in all), then errno {}",
        w2.written, w2.errno
    );
    assert_eq!(w2.errno, limit_errno, "{w2:?}");
    assert!(w2.written >= 19 * MIB && total <= 30 * MIB, "{w2:?}");
    let u = usage(fs_fd, id).unwrap();
    println!("usage after the second write: {u:?}");
    assert!(
        u.used_bytes >= total && u.used_bytes <= total + 256 * 1024,
        "usage {} vs {total}",
        u.used_bytes
    );
    assert_eq!(fs::metadata(&data).unwrap().len(), total);

    // Root: XFS enforces the limit on it too, ext4 lets CAP_SYS_RESOURCE past it.
    let w3 = write_as(None, &data, MIB);
    println!(
        "as root at the limit: wrote {} bytes, errno {}",
        w3.written, w3.errno
    );
    match fs {
        Filesystem::Xfs => assert_eq!(
            (w3.errno, w3.written < 64 * 1024),
            (libc::ENOSPC, true),
            "{w3:?}"
        ),
        Filesystem::Ext4 => assert_eq!((w3.errno, w3.written), (0, MIB), "{w3:?}"),
    }

    // A smaller limit (a hypothetical shrink) is accepted and rounds up to whole KiB.
    set_limit(fs_fd, id, Some(40 * MIB + 1)).unwrap();
    let limit = usage(fs_fd, id).unwrap().limit_bytes.unwrap();
    assert!(
        (40 * MIB + 1024..=40 * MIB + 4096).contains(&limit),
        "limit {limit}"
    );

    // Remove: reset the limit, delete the directory; the id is free again.
    set_limit(fs_fd, id, None).unwrap();
    assert_eq!(usage(fs_fd, id).unwrap().limit_bytes, None);
    drop(dir);
    fs::remove_dir_all(&vol).unwrap();
    assert_unused(fs_fd, id);
    let again = fresh_dir(mount, "vol-again");
    assert_eq!(
        assign_new_project(fs_fd, again.as_fd(), id).unwrap(),
        id,
        "a freed id is reusable"
    );
    drop(again);
    fs::remove_dir(mount.join("vol-again")).unwrap();
    assert_unused(fs_fd, id);
    println!(
        "limits: {fs} stops uid {NOBODY} with errno {limit_errno} at 10 MiB, at 30 MiB after expansion; removal frees the id: ok"
    );
}

#[derive(Debug, Clone, Copy)]
struct WriteOutcome {
    written: u64,
    errno: i32,
    uid: u64,
    cap_eff: u64,
    cap_prm: u64,
}

/// Appends up to `max` bytes to `path` in a forked child, as `uid` (and its group, no
/// supplementary groups: a real drop of every capability) or as root; stops at the first error.
fn write_as(uid: Option<u32>, path: &Path, max: u64) -> WriteOutcome {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let chunk = vec![0xa5u8; MIB as usize];
    let out = in_child(move || {
        if let Some(uid) = uid {
            let id = nix::unistd::Gid::from_raw(uid);
            if nix::unistd::setgroups(&[]).is_err()
                || nix::unistd::setgid(id).is_err()
                || nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).is_err()
            {
                return vec![u64::MAX];
            }
        }
        let (eff, prm) = capabilities();
        // SAFETY: plain syscalls on a NUL-terminated path and a live buffer.
        let fd = unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                0o644,
            )
        };
        if fd < 0 {
            return vec![
                u64::MAX - 1,
                io::Error::last_os_error().raw_os_error().unwrap_or(0) as u64,
            ];
        }
        let mut written = 0u64;
        let mut errno = 0;
        while written < max {
            let n = (max - written).min(chunk.len() as u64) as usize;
            let r = unsafe { libc::write(fd, chunk.as_ptr().cast(), n) };
            if r < 0 {
                errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                break;
            }
            written += r as u64;
        }
        if unsafe { libc::fsync(fd) } < 0 && errno == 0 {
            errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        }
        unsafe { libc::close(fd) };
        vec![
            written,
            errno as u64,
            nix::unistd::getuid().as_raw() as u64,
            eff,
            prm,
        ]
    });
    assert!(out.len() == 5, "writer child failed: {out:?}");
    WriteOutcome {
        written: out[0],
        errno: out[1] as i32,
        uid: out[2],
        cap_eff: out[3],
        cap_prm: out[4],
    }
}

/// This process's effective and permitted capability sets (`capget`).
fn capabilities() -> (u64, u64) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget with a v3 header fills two data structs.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    assert_eq!(r, 0, "capget");
    (
        u64::from(d[0].effective) | u64::from(d[1].effective) << 32,
        u64::from(d[0].permitted) | u64::from(d[1].permitted) << 32,
    )
}

fn pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (File::from(r), File::from(w))
}

/// Runs `f` in a forked child and returns what it returned. The child never returns into the
/// test harness: it `_exit`s.
fn in_child(f: impl FnOnce() -> Vec<u64>) -> Vec<u64> {
    let (mut r, w) = pipe();
    // SAFETY: the child only runs `f` (syscalls and allocation, which glibc keeps usable after
    // fork) and exits with `_exit`.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(r);
            let out = f();
            let mut w = w;
            let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let ok = w.write_all(&bytes).is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).unwrap();
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert!(
                matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
                "child: {status:?}"
            );
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
                .collect()
        }
    }
}

const PROCESSES: u32 = 8;
const PER_PROCESS: u32 = 50;
const THREADS: u32 = 8;
const PER_THREAD: u32 = 25;

/// Checks a batch of allocations: no id twice, each directory carries its id, each id counts
/// exactly its directory. Then frees them.
fn verify_allocations(
    fs_fd: BorrowedFd<'_>,
    parent: &Path,
    got: &[(PathBuf, u32)],
    expected: usize,
) {
    assert_eq!(got.len(), expected);
    let mut ids: Vec<u32> = got.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), expected, "duplicate project ids handed out");
    for (dir, id) in got {
        assert_eq!(project_at(dir), (*id, true), "{}", dir.display());
        assert_eq!(
            usage(fs_fd, *id).unwrap().inodes,
            1,
            "project {id} counts more than {}",
            dir.display()
        );
    }
    fs::remove_dir_all(parent).unwrap();
    for id in ids {
        assert_unused(fs_fd, id);
    }
}

fn check_concurrent_processes(mount: &Path, fs_fd: BorrowedFd<'_>) {
    let parent = mount.join("alloc-procs");
    let _ = fs::remove_dir_all(&parent);
    fs::create_dir(&parent).unwrap();
    // All allocators aim at the same candidates (`base + 8 * i` in round i) so that they race.
    let base = random_start().min(PROJECT_ID_MAX - 10_000);
    let (go_r, go_w) = pipe();
    let mut children = Vec::new();
    for k in 0..PROCESSES {
        let (r, w) = pipe();
        // SAFETY: as in `in_child`.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                drop(go_w);
                drop(r);
                let mut go_r = go_r;
                let _ = go_r.read(&mut [0u8; 1]); // EOF when the parent lets everyone go
                let fs_dup = File::open(mount).unwrap();
                let mut out = String::new();
                let mut ok = true;
                for i in 0..PER_PROCESS {
                    let path = parent.join(format!("p{k}-{i}"));
                    let res = fs::create_dir(&path)
                        .and_then(|()| File::open(&path))
                        .and_then(|d| assign_new_project(fs_dup.as_fd(), d.as_fd(), base + 8 * i));
                    match res {
                        Ok(id) => out += &format!("{} {id}\n", path.display()),
                        Err(e) => {
                            out += &format!("ERROR {} {e}\n", path.display());
                            ok = false;
                        }
                    }
                }
                let s = allocation_stats();
                out += &format!(
                    "STATS {} {} {}\n",
                    s.assigned, s.skipped_in_use, s.collisions
                );
                let mut w = w;
                let _ = w.write_all(out.as_bytes());
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(w);
                children.push((child, r));
            }
        }
    }
    drop(go_r);
    let t = Instant::now();
    drop(go_w); // go
    let mut got = Vec::new();
    let (mut skipped, mut collisions) = (0u64, 0u64);
    let mut errors = Vec::new();
    for (child, mut r) in children {
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        let status = nix::sys::wait::waitpid(child, None).unwrap();
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["STATS", _, s, c] => {
                    skipped += s.parse::<u64>().unwrap();
                    collisions += c.parse::<u64>().unwrap();
                }
                ["ERROR", ..] => errors.push(line.to_string()),
                [path, id] => got.push((PathBuf::from(path), id.parse::<u32>().unwrap())),
                _ => panic!("bad line from a child: {line}"),
            }
        }
        if !matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)) {
            errors.push(format!("child {child}: {status:?}"));
        }
    }
    let elapsed = t.elapsed();
    assert!(errors.is_empty(), "allocation errors: {errors:?}");
    verify_allocations(fs_fd, &parent, &got, (PROCESSES * PER_PROCESS) as usize);
    println!(
        "concurrent processes: {PROCESSES} x {PER_PROCESS} ids in {:.2}s, all distinct; {skipped} \
         candidates skipped as in use, {collisions} collisions retreated from",
        elapsed.as_secs_f64()
    );
}

fn check_concurrent_threads(mount: &Path, fs_fd: BorrowedFd<'_>) {
    let parent = mount.join("alloc-threads");
    let _ = fs::remove_dir_all(&parent);
    fs::create_dir(&parent).unwrap();
    let base = random_start().min(PROJECT_ID_MAX - 10_000);
    let before = allocation_stats();
    let barrier = std::sync::Barrier::new(THREADS as usize);
    let t = Instant::now();
    let got: Vec<(PathBuf, u32)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                let (parent, barrier) = (&parent, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    (0..PER_THREAD)
                        .map(|i| {
                            let path = parent.join(format!("t{k}-{i}"));
                            fs::create_dir(&path).unwrap();
                            let d = File::open(&path).unwrap();
                            let id = assign_new_project(fs_fd, d.as_fd(), base + 8 * i).unwrap();
                            (path, id)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = t.elapsed();
    let after = allocation_stats();
    verify_allocations(fs_fd, &parent, &got, (THREADS * PER_THREAD) as usize);
    println!(
        "concurrent threads: {THREADS} x {PER_THREAD} ids in {:.2}s, all distinct; {} candidates \
         skipped as in use, {} collisions retreated from",
        elapsed.as_secs_f64(),
        after.skipped_in_use - before.skipped_in_use,
        after.collisions - before.collisions
    );
}

// ------------------------------------------------------------------------------------------------
// The facade the agent goes through: `Quotas` and `VolumeStore` (and `clone::copy_into`).
// ------------------------------------------------------------------------------------------------

const FACADE_THREADS: usize = 4;
const FACADE_PER_THREAD: usize = 5;

fn project_limit(limit: Option<Limit>) -> u32 {
    match limit {
        Some(Limit::Project(id)) => id,
        other => panic!("expected a project limit, got {other:?}"),
    }
}

/// Both files hold the same `len` bytes (read in 1 MiB chunks: big buffers are slow under TCG).
fn assert_same_content(a: &Path, b: &Path, len: u64) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    assert_eq!(fa.metadata().unwrap().len(), len, "{}", a.display());
    assert_eq!(fb.metadata().unwrap().len(), len, "{}", b.display());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        assert!(
            ba[..n] == bb[..n],
            "{} and {} differ in [{pos}, {pos}+{n})",
            a.display(),
            b.display()
        );
        pos += n as u64;
    }
}

fn gone(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

fn assert_removed(what: Removed, name: &str) -> String {
    match what {
        Removed::Done(what) => what,
        other => panic!("removing {name}: {other:?}"),
    }
}

/// Detection, provisioning, crash-safe re-provisioning, expansion, usage, concurrent provisioning,
/// cloning and removal, as the agent does them, on a root with project quotas enforced.
fn check_facade(fs: Filesystem, mount: &Path, fs_fd: BorrowedFd<'_>) {
    let t = Instant::now();
    let (mechanism, limit_errno) = match fs {
        Filesystem::Xfs => (Mechanism::XfsProject, libc::ENOSPC),
        Filesystem::Ext4 => (Mechanism::Ext4Project, libc::EDQUOT),
    };
    let quotas = Quotas::detect(fs_fd, QuotaMode::Auto);
    assert_eq!(quotas.enforcement, Enforcement::Enforced(mechanism));
    assert_eq!(
        Quotas::detect(fs_fd, QuotaMode::Required).enforcement,
        Enforcement::Enforced(mechanism)
    );
    let off = Quotas::detect(fs_fd, QuotaMode::Off);
    assert_eq!(off.mechanism(), None, "{off:?}");

    let store = VolumeStore::open(mount).unwrap();
    let params = ClassParameters::default();
    let name = "pvc-1_ns_a";
    let vol = mount.join(name);
    let data = vol.join("data");

    // Provision 10 MiB; a second pass (after a crash) finds the same directory and id.
    let (outcome, limit) = store
        .ensure_volume(name, &params, &quotas, 10 * MIB)
        .unwrap();
    assert_eq!(outcome, Outcome::Created);
    let id = project_limit(limit);
    assert_eq!(project_at(&vol), (id, true));
    assert_eq!(quotas.project_of(fs_fd, name).unwrap(), Some(id));
    let u = usage(fs_fd, id).unwrap();
    assert_eq!((u.inodes, u.limit_bytes), (1, Some(10 * MIB)), "{u:?}");
    assert_eq!(
        fs::metadata(&vol).unwrap().permissions().mode() & 0o7777,
        params.mode
    );
    assert_eq!(statfs_size(&vol).0, 10 * MIB);
    assert_eq!(
        store
            .ensure_volume(name, &params, &quotas, 10 * MIB)
            .unwrap(),
        (Outcome::Reused, Some(Limit::Project(id))),
        "a second pass must reuse the directory and its id"
    );
    assert_eq!(usage(fs_fd, id).unwrap().limit_bytes, Some(10 * MIB));

    let w1 = write_as(Some(NOBODY), &data, 40 * MIB);
    assert_eq!(w1.errno, limit_errno, "{w1:?}");
    assert!((9 * MIB..=10 * MIB).contains(&w1.written), "{w1:?}");

    // Expansion to 30 MiB.
    assert_eq!(
        quotas.limit(fs_fd, name, 30 * MIB).unwrap(),
        Some(Limit::Project(id))
    );
    assert_eq!(usage(fs_fd, id).unwrap().limit_bytes, Some(30 * MIB));
    let w2 = write_as(Some(NOBODY), &data, 40 * MIB);
    let total = w1.written + w2.written;
    assert_eq!(w2.errno, limit_errno, "{w2:?}");
    assert!(w2.written >= 19 * MIB && total <= 30 * MIB, "{w2:?}");
    assert_eq!(
        quotas.reapply(fs_fd, name, 30 * MIB).unwrap(),
        Some(Limit::Project(id))
    );
    assert_eq!(quotas.reapply(fs_fd, "pvc-404_ns_a", MIB).unwrap(), None);

    let names = [name.to_string(), "pvc-404_ns_a".to_string()];
    let report = quotas.usage(fs_fd, &names).unwrap().expect("enforced");
    assert_eq!(report.len(), 1, "{report:?}");
    let u = report[name];
    assert!(
        (total..=total + 256 * 1024).contains(&u.used_bytes),
        "usage {u:?} vs {total} bytes written"
    );
    assert_eq!(
        (u.inodes, u.limit_bytes),
        (Some(2), Some(30 * MIB)),
        "{u:?}"
    );
    println!(
        "facade: {name} made with project {id} (10 MiB; reused on a second pass), uid {NOBODY} \
         stopped at {} bytes, {total} after expansion to 30 MiB; usage {} bytes",
        w1.written, u.used_bytes
    );

    // The clone below copies 12 MiB of it (less to copy and compare under TCG).
    let cloned = 12 * MIB;
    File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(cloned)
        .unwrap();
    nix::unistd::syncfs(fs_fd).unwrap();
    let u = usage(fs_fd, id).unwrap();
    assert!(
        (cloned..=cloned + 256 * 1024).contains(&u.used_bytes),
        "usage after truncating to {cloned}: {u:?}"
    );

    let provisioned = t.elapsed();
    check_facade_concurrent(&store, &quotas, mount, fs_fd);
    let method = check_copy_method(fs, &store, &quotas, mount, fs_fd);
    let probed = t.elapsed();

    // Clone into 40 MiB: a copy with a project and limit of its own.
    let clone_name = "pvc-2_ns_b";
    let cvol = mount.join(clone_name);
    let tc = Instant::now();
    let (outcome, limit) = store
        .ensure_clone(
            name,
            "pvc-1",
            clone_name,
            "pvc-2",
            &params,
            &quotas,
            40 * MIB,
        )
        .unwrap();
    let clone_time = tc.elapsed();
    let id2 = project_limit(limit);
    assert_ne!(id2, id, "the clone needs a project of its own");
    assert!(gone(&mount.join("cloning-pvc-2_ns_b")), "staging left");
    assert_eq!(project_at(&cvol), (id2, true));
    assert_eq!(statfs_size(&cvol).0, 40 * MIB);
    assert_eq!(project_at(&cvol.join("data")).0, id2);
    assert_eq!(project_at(&data).0, id);
    let tr = Instant::now();
    assert_same_content(&data, &cvol.join("data"), cloned);
    let compare_time = tr.elapsed();
    let both = [name.to_string(), clone_name.to_string()];
    let report = quotas.usage(fs_fd, &both).unwrap().expect("enforced");
    let (us, uc) = (report[name], report[clone_name]);
    assert_eq!(
        (us.used_bytes, us.inodes, us.limit_bytes),
        (u.used_bytes, Some(2), Some(30 * MIB)),
        "the source's usage changed"
    );
    assert!(
        (cloned..=cloned + 256 * 1024).contains(&uc.used_bytes),
        "clone usage {uc:?} vs {cloned} bytes"
    );
    assert_eq!(
        (uc.inodes, uc.limit_bytes),
        (Some(2), Some(40 * MIB)),
        "{uc:?}"
    );
    let tw = Instant::now();
    let w3 = write_as(Some(NOBODY), &cvol.join("data"), 40 * MIB);
    let write_time = tw.elapsed();
    assert_eq!(w3.errno, limit_errno, "{w3:?}");
    assert!(
        (39 * MIB..=40 * MIB).contains(&(cloned + w3.written)),
        "{w3:?}"
    );
    assert_eq!(
        store
            .ensure_clone(
                name,
                "pvc-1",
                clone_name,
                "pvc-2",
                &params,
                &quotas,
                40 * MIB
            )
            .unwrap(),
        (Outcome::Reused, Some(Limit::Project(id2)))
    );
    println!(
        "facade: clone {clone_name} in {:.2}s (first call said {outcome:?}), project {id2}, \
         40 MiB; data equal, usage {} bytes; uid {NOBODY} stopped at {} bytes in all (copy method \
         on a scratch pair: {method:?})",
        clone_time.as_secs_f64(),
        uc.used_bytes,
        cloned + w3.written
    );

    // Removal with the recorded limit; a retry (the volume already gone) is done too.
    let trm = Instant::now();
    let what = assert_removed(
        quotas
            .remove_volume(fs_fd, name, Some(Limit::Project(id)))
            .unwrap(),
        name,
    );
    assert!(gone(&vol));
    assert_eq!(usage(fs_fd, id).unwrap().limit_bytes, None);
    assert_unused(fs_fd, id);
    let again = assert_removed(
        quotas
            .remove_volume(fs_fd, name, Some(Limit::Project(id)))
            .unwrap(),
        name,
    );
    assert_unused(fs_fd, id);
    // The clone without a record: its id is read from the directory.
    assert_removed(
        quotas.remove_volume(fs_fd, clone_name, None).unwrap(),
        clone_name,
    );
    assert!(gone(&cvol));
    assert_unused(fs_fd, id2);
    println!(
        "facade: removal: {what}; retry: {again}; ids {id} and {id2} free (compare {:.2}s, \
         clone write {:.2}s, removals {:.2}s)",
        compare_time.as_secs_f64(),
        write_time.as_secs_f64(),
        trm.elapsed().as_secs_f64()
    );
    println!(
        "facade: all checks in {:.2}s (provisioning and writes {:.2}s, concurrent and copy probe \
         {:.2}s, clone and removal {:.2}s)",
        t.elapsed().as_secs_f64(),
        provisioned.as_secs_f64(),
        (probed - provisioned).as_secs_f64(),
        (t.elapsed() - probed).as_secs_f64()
    );
}

/// Volumes made at the same time from several threads, as the agent's blocking pool does: each gets
/// its own id. Then removed, with and without the recorded limit, and after a crash that left the
/// limit behind.
fn check_facade_concurrent(
    store: &VolumeStore,
    quotas: &Quotas,
    mount: &Path,
    fs_fd: BorrowedFd<'_>,
) {
    let params = ClassParameters::default();
    let barrier = std::sync::Barrier::new(FACADE_THREADS);
    let t = Instant::now();
    let got: Vec<(String, u32)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..FACADE_THREADS)
            .map(|k| {
                let (barrier, params) = (&barrier, &params);
                s.spawn(move || {
                    barrier.wait();
                    (0..FACADE_PER_THREAD)
                        .map(|i| {
                            let name = format!("pvc-c{k}-{i}_ns_c");
                            let (outcome, limit) =
                                store.ensure_volume(&name, params, quotas, 2 * MIB).unwrap();
                            assert_eq!(outcome, Outcome::Created, "{name}");
                            (name, project_limit(limit))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = t.elapsed();
    let n = FACADE_THREADS * FACADE_PER_THREAD;
    let mut ids: Vec<u32> = got.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate project ids: {got:?}");
    let names: Vec<String> = got.iter().map(|(name, _)| name.clone()).collect();
    let report = quotas.usage(fs_fd, &names).unwrap().expect("enforced");
    assert_eq!(report.len(), n);
    for (name, id) in &got {
        assert_eq!(project_at(&mount.join(name)), (*id, true), "{name}");
        assert_eq!(quotas.project_of(fs_fd, name).unwrap(), Some(*id));
        let u = report[name];
        assert_eq!(
            (u.inodes, u.limit_bytes),
            (Some(1), Some(2 * MIB)),
            "{name}: {u:?}"
        );
    }
    for (i, (name, id)) in got.iter().enumerate() {
        let recorded = Some(Limit::Project(*id));
        let removed = match i % 3 {
            0 => quotas.remove_volume(fs_fd, name, recorded),
            1 => quotas.remove_volume(fs_fd, name, None),
            _ => {
                // A crash after the directory went, before the limit was reset.
                fs::remove_dir(mount.join(name)).unwrap();
                assert_eq!(usage(fs_fd, *id).unwrap().limit_bytes, Some(2 * MIB));
                quotas.remove_volume(fs_fd, name, recorded)
            }
        };
        assert_removed(removed.unwrap(), name);
        assert!(gone(&mount.join(name)), "{name}");
    }
    for id in ids {
        assert_unused(fs_fd, id);
    }
    println!(
        "facade: {FACADE_THREADS} threads x {FACADE_PER_THREAD} volumes in {:.2}s, all distinct \
         ids; removed (recorded, found, after a crash): all ids free",
        elapsed.as_secs_f64()
    );
}

/// How `clone::copy_into` fills one volume from another (each with its project, as in a clone):
/// reflinked on XFS (mkfs.xfs makes reflink=1 filesystems), copied on ext4. Free space says whether
/// the extents were really shared.
fn check_copy_method(
    fs: Filesystem,
    store: &VolumeStore,
    quotas: &Quotas,
    mount: &Path,
    fs_fd: BorrowedFd<'_>,
) -> Method {
    let params = ClassParameters::default();
    let (src, dst) = ("pvc-s1_ns_x", "pvc-s2_ns_x");
    let sid = project_limit(
        store
            .ensure_volume(src, &params, quotas, 8 * MIB)
            .unwrap()
            .1,
    );
    let did = project_limit(
        store
            .ensure_volume(dst, &params, quotas, 8 * MIB)
            .unwrap()
            .1,
    );
    let size = 4 * MIB;
    fs::write(mount.join(src).join("f"), vec![0x5au8; size as usize]).unwrap();
    nix::unistd::syncfs(fs_fd).unwrap();
    let free = || {
        nix::sys::statvfs::fstatvfs(fs_fd)
            .map(|s| s.blocks_free() * s.fragment_size())
            .unwrap()
    };
    let before = free();
    let stats = copy_into(fs_fd, src, dst).unwrap();
    nix::unistd::syncfs(fs_fd).unwrap();
    let consumed = before.saturating_sub(free());
    let u = usage(fs_fd, did).unwrap();
    println!(
        "copy_into between projects {sid} and {did}: {stats:?}; free space went down by {consumed} \
         bytes for {size}; the target's project counts {} bytes",
        u.used_bytes
    );
    assert_eq!((stats.files, stats.bytes), (1, size), "{stats:?}");
    // ext4 also counts the directory's block.
    assert!(
        (size..=size + 64 * 1024).contains(&u.used_bytes),
        "the target's project counts its copy: {u:?}"
    );
    match (fs, stats.method) {
        (Filesystem::Xfs, Method::Reflink) => assert!(consumed < MIB, "reflink used {consumed}"),
        (Filesystem::Ext4, Method::Copy) => assert!(consumed >= size, "copy used {consumed}"),
        other => panic!("unexpected copy method {other:?}"),
    }
    for (name, id) in [(src, sid), (dst, did)] {
        assert_removed(quotas.remove_volume(fs_fd, name, None).unwrap(), name);
        assert_unused(fs_fd, id);
    }
    stats.method
}

/// The facade on a root without enforcement: `auto` provisions without limits (and says what to
/// enable), `required` refuses, `off` is off.
fn check_facade_unlimited(mount: &Path, fs_fd: BorrowedFd<'_>, needles: &[&str]) {
    let quotas = Quotas::detect(fs_fd, QuotaMode::Auto);
    let Enforcement::Unlimited { reason } = &quotas.enforcement else {
        panic!("auto: expected unlimited, got {quotas:?}")
    };
    for needle in needles {
        assert!(reason.contains(needle), "reason lacks {needle:?}: {reason}");
    }
    let required = Quotas::detect(fs_fd, QuotaMode::Required);
    let Enforcement::Refusing { reason: refusing } = &required.enforcement else {
        panic!("required: expected refusing, got {required:?}")
    };
    assert_eq!(refusing, reason);
    assert_eq!(
        Quotas::detect(fs_fd, QuotaMode::Off).enforcement,
        Enforcement::Unlimited {
            reason: "quota mode off".into()
        }
    );

    let store = VolumeStore::open(mount).unwrap();
    let params = ClassParameters::default();
    let name = "pvc-9_ns_u";
    assert_eq!(
        store
            .ensure_volume(name, &params, &quotas, 10 * MIB)
            .unwrap(),
        (Outcome::Created, None)
    );
    assert_eq!(
        store
            .ensure_volume(name, &params, &quotas, 10 * MIB)
            .unwrap(),
        (Outcome::Reused, None)
    );
    assert_eq!(project_at(&mount.join(name)).0, 0);
    assert_eq!(quotas.limit(fs_fd, name, 30 * MIB).unwrap(), None);
    assert_eq!(quotas.usage(fs_fd, &[name.to_string()]).unwrap(), None);
    assert_eq!(quotas.project_of(fs_fd, name).unwrap(), None);
    assert_removed(quotas.remove_volume(fs_fd, name, None).unwrap(), name);
    assert!(gone(&mount.join(name)));
    println!(
        "facade: auto -> {}; required -> {}; volumes made and removed without limits",
        quotas.enforcement.describe(),
        required.enforcement.label()
    );
}
