#!/usr/bin/env bash
# What the monitoring tests need, idempotently, as root on Debian: `promtool` (tests/monitoring.rs runs
# `promtool check rules` and `promtool test rules` on deploy/monitoring/). It comes with Debian's
# `prometheus` package; the Prometheus server it also installs is not started by the tests.
set -euo pipefail
if ! command -v promtool >/dev/null; then
  echo "setup-monitoring: installing prometheus (for promtool) from Debian" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # policy-rc.d 101: the package's post-install must not start a Prometheus server on this machine.
  _policy=/usr/sbin/policy-rc.d
  _had_policy=false
  [[ -e $_policy ]] && _had_policy=true
  if ! $_had_policy; then
    printf '#!/bin/sh\nexit 101\n' >"$_policy"
    chmod +x "$_policy"
    trap 'rm -f "$_policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version 2>&1 | head -1 >&2
