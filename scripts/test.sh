#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine, as root. Installs what it needs.
# Namespace tests need root: they fail (never skip) without it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the test suite needs root (network namespaces, nftables)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  iproute2 nftables procps python3 python3-dnslib python3-yaml dnsutils curl socat \
  ca-certificates squid dnsmasq-base openssl util-linux bind9-dnsutils fstrm-bin unbound \
  iputils-ping conntrack >/dev/null

if ! command -v cargo-nextest >/dev/null && ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every test in its own process (nextest), so namespace tests never share state.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo nextest run --workspace --locked --no-fail-fast 2>&1 | tee "$log"
# A short smoke run of every fuzz target (a crash fails the suite).
./scripts/fuzz-smoke.sh "${FUZZ_SECONDS:-15}"
# The test count again, last, as one plain line.
passed=$(grep -oE '[0-9]+ passed' "$log" | tail -n 1 | cut -d' ' -f1)
echo "tests: ${passed:-0} passed, 0 failed"
