#!/usr/bin/env bash
# pvsync main job. Builds the VMM and the guest, boots the guest, then runs two VMs side by
# side on the VMM's slot scheduler with the paravirtual boost policy.
#
#   ./run.sh                 build; 4 vCPUs (self-tests) and 256 vCPUs (boot) with the shared region
#                            dumped; then two 4-vCPU VMs on the host's cores, metrics table + trace
#   ./run.sh test            install what a fresh machine lacks; fmt and clippy (host and guest),
#                            then every test
#   ./run.sh bench [boot|guest|sched|stockkvm|all]  boot: pvsync vs QEMU/KVM; guest: latencies
#                            1:1 vs 2x overcommit; sched: policies and placements side by side;
#                            stockkvm: KVM's own pv features on and off, QEMU/KVM and pvsync
#   ./run.sh study [ARGS]    the study (pbzip2, cpu-bound, ebizzy, postmark under each policy and
#                            placement): results/study-*/report.md; ARGS go to `pvsync study`
#                            (e.g. --quick, --reps 5, rcu)
#   ./run.sh soak [MINUTES]  every torture suite at 2x and 4x overcommit with pv, on both
#                            backends, plus hostile guests beside normal ones, for MINUTES (default
#                            5) per backend and overcommit; summary in target/soak/summary.txt
#   ./run.sh fuzz [SECONDS] [TARGET..]  the fuzz targets (nightly and cargo-fuzz, installed if
#                            missing), SECONDS each (default 60)
#   ./run.sh qemu [ARGS]     boot the guest under stock QEMU/KVM (4 vCPUs, self-tests); exits
#                            with pvsync's status for the guest's outcome (0, 1, 3, 125)
#   ./run.sh help            this usage (also -h, --help)
set -euo pipefail
cd "$(dirname "$0")"

GUEST=target/guest/x86_64-unknown-none/release/guest-kernel
VMM=target/release/pvsync
# QEMU's CPU model for the guest: qemu64 (nested KVM here rejects -cpu host's MSRs) with the
# x2APIC and KVM's paravirtual features the guest uses (QEMU leaves these four off by default).
QEMU_CPU=qemu64,+x2apic,kvm-pv-tlb-flush=on,kvm-pv-ipi=on,kvm-pv-sched-yield=on,kvm-pv-unhalt=on

# The guest's target; rustup does not add it to an already-installed toolchain by itself.
ensure_target() {
    rustup target add x86_64-unknown-none >/dev/null
}

# QEMU 7.2 from Debian: the tests and the benchmark boot the guest under stock QEMU/KVM too.
ensure_qemu() {
    command -v qemu-system-x86_64 >/dev/null && return
    echo "== installing qemu-system-x86 (Debian package)"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
}

build() {
    ensure_target
    echo "== building the VMM (release) and the guest kernel (x86_64-unknown-none)"
    cargo build --release -p host-vmm --bin pvsync
    # RUSTFLAGS meant for the host must not override the guest's own target flags.
    (cd guest-kernel && env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        cargo build --release --target-dir ../target/guest)
}

# The style gates of `./run.sh test`: formatting and clippy (warnings are errors), for the host
# workspace and for the guest (its own workspace). The first that fails stops the run and says
# which one failed and how to fix it.
check_style() {
    echo "== style: cargo fmt --check and cargo clippy -D warnings (host workspace, then guest)"
    cargo fmt --all -- --check ||
        style_failed "host code is not formatted: run 'cargo fmt --all'"
    cargo clippy --workspace --all-targets -- -D warnings ||
        style_failed "clippy rejects the host workspace (messages above)"
    (cd guest-kernel && cargo fmt -- --check) ||
        style_failed "guest code is not formatted: run '(cd guest-kernel && cargo fmt)'"
    # As in build(): RUSTFLAGS meant for the host must not override the guest's target flags.
    (cd guest-kernel && env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        cargo clippy --release --target-dir ../target/guest -- -D warnings) ||
        style_failed "clippy rejects the guest kernel (messages above)"
}

style_failed() {
    echo "*** FAILED: $1 ***" >&2
    exit 1
}

usage() {
    cat <<'USAGE'
usage: ./run.sh [COMMAND]
  main (default)               build; boot 4 vCPUs (self-tests) and 256 vCPUs (boot) with the
                               shared region dumped; then two VMs on the slot scheduler
  test                         fmt and clippy (host and guest), every test, then every fuzz
                               target for 10 s
  fuzz [SECONDS] [TARGET..]    the fuzz targets (fuzz/, nightly cargo-fuzz), 60 s each
  bench [boot|guest|sched|stockkvm|all]
                               benchmarks (default boot)
  study [STUDY ARGS]           the study (docs/study.md): results/study-<time>/report.md;
                               e.g. --quick (a few minutes), --reps 5, or experiments: ipi rcu
  qemu [QEMU ARGS]             boot the guest under stock QEMU/KVM; exits with pvsync's status
                               for the guest's outcome (0 success, 1 failure, 3 panic)
  help, -h, --help             this usage
USAGE
}

# QEMU's isa-debug-exit status is (code << 1) | 1; pvsync's statuses are the table in
# `pvsync --help`: guest code 0 -> 0, 2 (panic) -> 3, any other -> 1; a QEMU that exits
# without the device (status 0: triple fault with -no-reboot) is a crash, 125.
qemu_status() {
    local s=$1
    if (( s == 0 )); then echo 125; return; fi
    if (( s % 2 == 0 )); then echo "$s"; return; fi # QEMU's own error
    case $(( s >> 1 )) in
    0) echo 0 ;;
    2) echo 3 ;;
    *) echo 1 ;;
    esac
}

need_kvm() {
    if [[ ! -e /dev/kvm ]]; then
        echo "error: /dev/kvm is missing: pvsync needs KVM" >&2
        exit 1
    fi
}

# One soak run: `pvsync run` with ARGS on BACKEND, under an outer timeout (a VMM that hangs
# is a failure too); a failure keeps its log. Counts in soak_runs, soak_failures (this
# configuration), soak_failed_in_a_row and soak_logs (the whole soak).
soak_run() {
    local backend=$1 label=$2 status=0
    shift 2
    local log=target/soak/run.log
    soak_runs=$((soak_runs + 1))
    timeout -k 30 360 target/soak/pvsync run --kernel target/soak/guest-kernel --mem 128 \
        --backend "$backend" --policy pv --timeout 300 "$@" >"$log" 2>&1 || status=$?
    if ((status == 0)); then
        soak_failed_in_a_row=0
        return
    fi
    # Ctrl-C reached pvsync (it stops its guests and exits 130): the soak stops too.
    if ((status == 130)); then
        echo "run.sh soak: interrupted" >&2
        exit 130
    fi
    soak_failures=$((soak_failures + 1))
    soak_failed_in_a_row=$((soak_failed_in_a_row + 1))
    soak_logs=$((soak_logs + 1))
    local keep="target/soak/failure-$soak_logs.log"
    { echo "# $backend $label (status $status): pvsync run $*"; cat "$log"; } >"$keep"
    echo "*** soak: $backend $label FAILED with status $status (log: $keep)"
}

# `--vm` arguments for TEST on TOTAL vCPUs, named NAME-i, in as few VMs as the VMM's limits
# allow (VMs of 32 vCPUs, bigger ones past 8 VMs, at most 64 vCPUs each): a half of the
# soak's VMs is at most 8 VMs.
soak_vms() {
    local name=$1 total=$2 test=$3 i=0 size=32
    while ((size < 64 && total > 8 * size)); do
        size=$((size * 2 > 64 ? 64 : size * 2))
    done
    while ((total > 0 && i < 8)); do
        local n=$((total < size ? total : size))
        echo "--vm"
        echo "name=$name-$i,vcpus=$n,cmdline=test=$test"
        total=$((total - n))
        i=$((i + 1))
    done
}

# MINUTES, checked before anything is built.
soak_minutes() {
    if ! [[ $1 =~ ^[1-9][0-9]{0,4}$ ]]; then
        echo "run.sh soak: MINUTES must be a whole number from 1 to 99999, not '$1'" >&2
        exit 2
    fi
}

soak() {
    local minutes=$1
    mkdir -p target/soak
    # One soak at a time: they share target/soak.
    exec 9>target/soak/.lock
    if ! flock -n 9; then
        echo "run.sh soak: another soak is running (target/soak/.lock)" >&2
        exit 2
    fi
    rm -f target/soak/failure-*.log
    # The soak runs its own copy of this build: a rebuild meanwhile does not change it.
    cp "$VMM" target/soak/pvsync
    cp "$GUEST" target/soak/guest-kernel
    local summary=target/soak/summary.txt cpus suites
    cpus=$(nproc)
    suites=("locktorture lock=ticket duration=10000" "locktorture lock=mcs duration=10000"
        "rcutorture duration=10000" "rcuflood" "tlbtorture duration=10000")
    echo "# pvsync soak, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'): $minutes min per backend and overcommit, $cpus host CPUs, policy pv" >"$summary"
    local failed=0
    soak_logs=0
    for backend in slots linux; do
        for factor in 2 4; do
            local total=$((factor * cpus)) half=$((factor * cpus / 2))
            ((half > 0)) || half=1
            local end=$((SECONDS + minutes * 60)) rounds=0 started=$SECONDS
            soak_runs=0
            soak_failures=0
            soak_failed_in_a_row=0
            echo "== soak: $backend, ${factor}x overcommit ($total vCPUs on $cpus CPUs), $minutes min"
            # Rounds start until the time is up (the last one ends up to a round later).
            while ((SECONDS < end && soak_failed_in_a_row < 3)); do
                for suite in "${suites[@]}"; do
                    mapfile -t vms < <(soak_vms suite "$((2 * half))" "$suite")
                    soak_run "$backend" "${factor}x $suite" "${vms[@]}"
                done
                # Hostile guests beside normal ones, half the vCPUs each.
                for pair in "hostile-claims duration=10000|locktorture duration=10000" \
                    "hostile-page duration=10000|rcutorture duration=10000" \
                    "hostile-hold duration=10000|tlbtorture duration=10000"; do
                    mapfile -t vms < <(soak_vms hostile "$half" "${pair%%|*}"; soak_vms normal "$half" "${pair##*|}")
                    soak_run "$backend" "${factor}x ${pair%%|*} beside ${pair##*|}" "${vms[@]}"
                done
                rounds=$((rounds + 1))
            done
            local line="$backend ${factor}x: $rounds rounds, $soak_runs runs, $soak_failures failures in $(((SECONDS - started) / 60)) min"
            ((soak_failed_in_a_row < 3)) || line="$line (stopped: 3 failures in a row)"
            echo "$line" | tee -a "$summary"
            ((soak_failures == 0)) || failed=1
        done
    done
    echo "(summary: $summary)"
    return $failed
}

cmd=${1:-main}
case "$cmd" in
main)
    build
    need_kvm
    echo
    echo "== pvsync: 4 vCPUs, self-tests, shared region dumped at exit"
    "$VMM" run --kernel "$GUEST" --vcpus 4 --mem 128 --cmdline "test=selftest" --dump-shared
    echo
    echo "== pvsync: 256 vCPUs on $(nproc) host cores (overcommitted), boot test"
    "$VMM" run --kernel "$GUEST" --vcpus 256 --mem 768 --cmdline "test=boot" --dump-shared 2>&1 |
        grep -E '^(RESULT|SUCCESS|FAILURE|shared region|smp:|pvsync:)|^shared vcpu=(0|1|255) '
    echo
    echo "== pvsync: two 4-vCPU VMs on $(nproc) slots (policy pv, placement spread)"
    "$VMM" run --kernel "$GUEST" --policy pv --placement spread \
        --vm "name=tlb,vcpus=4,cmdline=test=tlbtorture duration=2000" \
        --vm "name=rcu,vcpus=4,cmdline=test=rcutorture duration=2000" \
        --metrics target/pvsync-metrics.json --trace target/pvsync-trace.json 2>&1 |
        grep -vE '^\[[a-z]+\] (cpu [0-9]+ online|clock:|shared:|pvsync-guest)'
    echo "(metrics: target/pvsync-metrics.json; trace: target/pvsync-trace.json, open in Perfetto)"
    ;;
test)
    ensure_target
    ensure_qemu
    if [[ -e /dev/kvm ]]; then
        # Where KVM exists the KVM tests must run: the harness fails instead of skipping.
        export PVSYNC_REQUIRE_KVM=1
    else
        echo "*** WARNING: /dev/kvm is missing: KVM and QEMU tests will be SKIPPED ***"
    fi
    check_style
    cargo test --workspace
    # Every fuzz target for a few seconds (nightly and cargo-fuzz for these only; where they
    # cannot be installed the script says so loudly and the rest stands).
    fuzz_status=0
    fuzz/run.sh 10 || fuzz_status=$?
    [ "$fuzz_status" -eq 0 ] || [ "$fuzz_status" -eq 3 ] || exit 1
    ;;
fuzz)
    shift
    fuzz/run.sh "$@"
    ;;
soak)
    soak_minutes "${2:-5}"
    build
    need_kvm
    soak "${2:-5}"
    ;;
bench)
    need_kvm
    ensure_target
    ensure_qemu
    what=${2:-boot}
    case "$what" in
    boot) cargo bench -p pvsync-tests --bench boot ;;
    guest) cargo bench -p pvsync-tests --bench guest ;;
    sched) cargo bench -p pvsync-tests --bench sched ;;
    stockkvm) cargo bench -p pvsync-tests --bench stockkvm ;;
    all) for b in boot guest sched stockkvm; do cargo bench -p pvsync-tests --bench "$b" || exit; done ;;
    *) echo "unknown benchmark '$what' (known: boot, guest, sched, stockkvm, all)" >&2; exit 2 ;;
    esac
    ;;
study)
    build
    need_kvm
    shift
    "$VMM" study --kernel "$GUEST" "$@"
    ;;
qemu)
    build
    need_kvm
    ensure_qemu
    shift
    status=0
    qemu-system-x86_64 -accel kvm -cpu "$QEMU_CPU" -machine microvm -nographic -nodefaults \
        -no-reboot -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -smp 4 -m 128 -kernel "$GUEST" -append "test=selftest" "$@" || status=$?
    mapped=$(qemu_status "$status")
    echo "qemu exit status $status (isa-debug-exit: (code << 1) | 1); pvsync status $mapped"
    exit "$mapped"
    ;;
help | -h | --help)
    usage
    ;;
*)
    echo "run.sh: unknown command '$cmd'" >&2
    usage >&2
    exit 2
    ;;
esac
