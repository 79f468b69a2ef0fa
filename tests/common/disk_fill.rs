//! Something other than hostvol filling a data root at a steady rate, as a busy tenant or a log
//! would, for the tests and benches of what the agent publishes while free space moves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Written at a time: small, so free space moves almost continuously, as under a streaming writer.
const CHUNK: usize = 64 << 10;

/// Writes `total_mib` MiB into a new file `name` in `dir` at `mib_per_second`, 64 KiB at a time,
/// paced against the start (not slept between writes, so a slow write does not slow the rate down),
/// each chunk synced so the filesystem's free space moves as it goes. Blocking: run it on a
/// blocking thread. Returns the file (the caller removes it when it wants the space back).
pub fn fill(dir: &Path, name: &str, total_mib: usize, mib_per_second: usize) -> PathBuf {
    let path = dir.join(name);
    let mut file =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![0x5au8; CHUNK];
    let chunks_per_mib = MIB / CHUNK;
    let start = Instant::now();
    for written in 1..=total_mib * chunks_per_mib {
        file.write_all(&chunk)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        file.sync_data().ok();
        // Pace: chunk number `written` is due at written / (rate in chunks) seconds after the start.
        let due = Duration::from_secs_f64(
            written as f64 / (mib_per_second.max(1) * chunks_per_mib) as f64,
        );
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    path
}
