#!/usr/bin/env bash
# Fuzzes every parser and validator that takes outside input (the targets in fuzz/fuzz_targets/),
# one target after the other, SECONDS each (default 60), on the stable toolchain.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz from crates.io if missing (idempotent). cargo-fuzz passes nightly-only flags to
# rustc; RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. Targets are built without a sanitizer
# (`-s none`): the code under test is safe Rust, so what is looked for is panics, and libFuzzer's
# coverage instrumentation works without one. Corpora grow in fuzz/corpus/<target> (seeded from
# fuzz/seeds/<target>), crashes land in fuzz/artifacts/<target>; both are git-ignored. Prints each
# target's executions and whether it found anything; exits non-zero if any target crashed.
# Not part of scripts/test.sh: it takes as long as it is given.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true

source scripts/ensure-tools.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

cd fuzz
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -s none

mkdir -p logs
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  if [[ -d "seeds/$target" ]]; then
    cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
  fi
  log="logs/$target.log"
  echo "fuzz: $target for ${seconds}s (log fuzz/$log)" >&2
  status=0
  cargo fuzz run -s none "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1 || status=$?
  execs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  rate=$(grep -m1 '^stat::average_exec_per_sec' "$log" | awk '{print $2}')
  units=$(ls "corpus/$target" | wc -l)
  if ((status != 0)); then
    failed+=("$target")
    summary+=("$target: FOUND A CRASH after ${execs:-?} executions (exit $status); see fuzz/$log and fuzz/artifacts/$target")
  else
    summary+=("$target: ${execs:-?} executions (${rate:-?}/s), corpus $units inputs, no crash")
  fi
done
printf '%s\n' "${summary[@]}"
((${#failed[@]} == 0))
