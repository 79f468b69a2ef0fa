# Sourced by scripts/demo.sh and scripts/test.sh before scripts/setup-control-plane.sh: makes sure
# kubectl and a C linker are installed (from Debian if missing) and cargo is on PATH.

_ensure_apt=()
command -v kubectl >/dev/null || _ensure_apt+=(kubernetes-client)
command -v cc >/dev/null || _ensure_apt+=(gcc libc6-dev)
if ((${#_ensure_apt[@]})); then
  echo "ensure-tools: installing ${_ensure_apt[*]} from Debian" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${_ensure_apt[@]}" >/dev/null
fi
unset _ensure_apt

# rustup installs into ~/.cargo/bin; a shell started before that may not have it on PATH yet.
if ! command -v cargo >/dev/null && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust with rustup (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y), then run this again." >&2
  exit 1
fi
