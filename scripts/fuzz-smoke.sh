#!/usr/bin/env bash
# A short smoke run of every fuzz target under fuzz/ (cargo-fuzz, libFuzzer) on stable Rust:
# `-s none` builds without a sanitizer, which would need nightly. Installs cargo-fuzz if it is
# missing. Fails on the first target that crashes; libFuzzer writes the input to
# fuzz/artifacts/<target>/, and `cargo fuzz run -s none <target> <that file>` replays it.
#
#   scripts/fuzz-smoke.sh [SECONDS_PER_TARGET [TARGET...]]     (default: 20 s, every target)
#
# Each target starts from the seeds in fuzz/seeds/<target>/ (committed) and adds what it finds
# to fuzz/corpus/<target>/ (not committed, reused by later runs on the same machine).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

seconds="${1:-20}"
[ "$#" -gt 0 ] && shift
case "$seconds" in
  '' | *[!0-9]*)
    echo "scripts/fuzz-smoke.sh: seconds must be a whole number, not '$seconds'" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

# One build of every target first, so that the time given is spent fuzzing.
cargo fuzz build -s none

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
  corpora=("$root/fuzz/corpus/$target")
  mkdir -p "${corpora[0]}"
  if [ -d "$root/fuzz/seeds/$target" ]; then
    corpora+=("$root/fuzz/seeds/$target")
  fi
  echo "fuzz-smoke: $target, ${seconds}s"
  # libFuzzer exits non-zero on a panic, on one input running over 10 s, or on using more
  # than 2 GB: each fails the smoke run.
  status=0
  cargo fuzz run -s none "$target" "${corpora[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^(Done [0-9]+ runs|stat::number_of_executed_units)' "$log" || true
  if [ "$status" != 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz-smoke: $target failed (exit $status); see fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
echo "fuzz-smoke: ${#targets[@]} target(s), ${seconds}s each, no crash"
