#!/usr/bin/env bash
# Runs the fuzz targets with libFuzzer through cargo-fuzz (nightly, for the targets only;
# the project builds on stable). Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# The corpus of each target lives in fuzz/corpus/TARGET; the repository keeps them,
# minimised (`cargo +nightly fuzz cmin TARGET corpus/TARGET`), as fuzz/corpus.tar.gz.
# Exit status: 0 if every target ran clean, 1 if one found a crash (its input is under
# fuzz/artifacts/TARGET), 3 if the tools could not be installed (said loudly).
set -uo pipefail
cd "$(dirname "$0")"
[ -d corpus ] || tar xzf corpus.tar.gz
secs=${1:-60}
if ! [[ $secs =~ ^[1-9][0-9]{0,6}$ ]]; then
    echo "fuzz/run.sh: SECONDS must be a whole number from 1, not '$secs' (usage: fuzz/run.sh [SECONDS] [TARGET...])" >&2
    exit 2
fi
shift || true
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal ||
        { echo "*** fuzz: cannot install a nightly toolchain: fuzz targets NOT RUN ***"; exit 3; }
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked ||
        { echo "*** fuzz: cannot install cargo-fuzz: fuzz targets NOT RUN ***"; exit 3; }
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
if [ ${#targets[@]} -eq 0 ]; then
    echo "*** fuzz: no targets (cargo +nightly fuzz list failed or found none) ***"
    exit 1
fi
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1
    status=$?
    runs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    if [ $status -eq 0 ]; then
        echo "fuzz $t: ${runs:-?} executions in ${secs} s, no crash"
        rm -f "$log"
    else
        echo "*** fuzz $t FAILED (status $status; whole log: $log):"
        grep -E '==[0-9]+== ERROR|^SUMMARY|panicked|artifact_prefix|Test unit written|^error' "$log" | head -20
        failed=1
    fi
done
exit $failed
