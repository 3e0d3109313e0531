#!/usr/bin/env bash
# Runs the fuzz targets with libFuzzer through cargo-fuzz (nightly, for the targets only;
# the project builds on stable). Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# The corpus of each target lives in fuzz/corpus/TARGET; the repository keeps them,
# minimised (`cargo +nightly fuzz cmin TARGET corpus/TARGET`), as fuzz/corpus.tar.gz.
set -euo pipefail
cd "$(dirname "$0")"
[ -d corpus ] || tar xzf corpus.tar.gz
secs=${1:-60}
shift || true
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 |
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done|==[0-9]+== ERROR|SUMMARY)' || true
done
