#!/usr/bin/env bash
# Usage: fuzz/run.sh <target> [seconds] [extra libFuzzer flags...]
#
# Runs one cargo-fuzz target on the stable toolchain (RUSTC_BOOTSTRAP=1 lets stable
# rustc take the nightly-only sanitizer flags cargo-fuzz passes). New inputs go to
# fuzz/corpus-gen/<target>/ (not committed); the committed seeds in
# fuzz/corpus/<target>/ are read but never written to. Crashes land in
# fuzz/artifacts/<target>/. Ends with libFuzzer's final stats line.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 <target> [seconds] [libFuzzer flags...]" >&2
    echo "targets: $(ls "$(dirname "$0")/fuzz_targets" | sed 's/\.rs$//' | tr '\n' ' ')" >&2
    exit 2
fi
target=$1
seconds=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))

cd "$(dirname "$0")"
if [ ! -f "fuzz_targets/$target.rs" ]; then
    echo "unknown target: $target" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1
# Sanitizer: address by default; FUZZ_SANITIZER=none for a faster uninstrumented build.
sanitizer=${FUZZ_SANITIZER:-address}

mkdir -p "corpus-gen/$target" "corpus/$target" "artifacts/$target"
flags=(
    "-max_total_time=$seconds"
    "-artifact_prefix=artifacts/$target/"
    "-print_final_stats=1"
    "-timeout=10"
    "-max_len=16384"
)
if [ -f "dict/$target.dict" ]; then
    flags+=("-dict=dict/$target.dict")
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The first corpus directory receives new inputs; the seeds are only read.
cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus-gen/$target" "corpus/$target" -- \
    "${flags[@]}" "$@" 2>&1 | tee "$log" || status=$?

echo "--- $target: final stats (${seconds}s) ---"
grep -E '^#[0-9]+[[:space:]]+(DONE|INITED|NEW|REDUCE|pulse)' "$log" | tail -1 || true
grep -E '^stat::' "$log" || true
exit "$status"
