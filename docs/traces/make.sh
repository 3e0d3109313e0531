#!/usr/bin/env bash
# Regenerates the traces and timelines of docs/tracing.md: each of the three problems
# without its fix and with it, on the slot scheduler (4 vCPUs on 2 slots: 2x overcommit).
#   docs/traces/make.sh            (after ./run.sh has built the VMM and the guest)
# The JSON traces go to target/doc-traces/ (open them in ui.perfetto.dev); the SVGs here.
set -euo pipefail
cd "$(dirname "$0")/../.."
VMM=target/release/pvsync
GUEST=target/guest/x86_64-unknown-none/release/guest-kernel
OUT=target/doc-traces
mkdir -p "$OUT"

run() { # name, then pvsync run arguments
    local name=$1
    shift
    "$VMM" run --kernel "$GUEST" --timeout 120 --trace "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.log" ||
        { cat "$OUT/$name.log" >&2; exit 1; }
}

draw() { # name, title, then pvsync timeline arguments
    local name=$1 title=$2
    shift 2
    "$VMM" timeline "$OUT/$name.json" --out "docs/traces/$name.svg" --width 1200 --title "$title" "$@"
}

# 1. IPI receivers in user mode: a TLB shootdown waits for user-mode readers.
for policy in kvm pv; do
    run "ipi-$policy" --vcpus 4 --slots 2 --slice-us 20000 --policy "$policy" --cmdline "test=tlbtorture duration=1000"
    draw "ipi-$policy" "tlbtorture, 4 vCPUs on 2 slots, 20 ms slices, policy $policy: the longest shootdown wait" \
        --focus ipi-wait --margin-ms 1 --processes VM --tracks state,shootdown,mode
done

# 2. Stacking: two 2-vCPU VMs on 2 slots, wake-affine placement vs spread.
for placement in wake-affine spread; do
    run "stacking-$placement" --slots 2 --placement "$placement" --policy none \
        --vm name=a,vcpus=2,cmdline="test=locktorture duration=1000" \
        --vm name=b,vcpus=2,cmdline="test=locktorture duration=1000"
    draw "stacking-$placement" "two 2-vCPU VMs on 2 slots, placement $placement: who runs where" \
        --from-ms 385 --to-ms 445 --tracks slot,state
done

# 3. RCU-reader preemption: a grace period waits for preempted readers.
for policy in none pv; do
    run "rcu-$policy" --vcpus 4 --slots 2 --slice-us 20000 --policy "$policy" --cmdline "test=rcutorture duration=2000"
    draw "rcu-$policy" "rcutorture, 4 vCPUs on 2 slots, 20 ms slices, policy $policy: the longest grace period" \
        --focus grace-period --margin-ms 1 --processes VM --tracks "grace periods",state,rcu
done
echo "traces in $OUT, timelines in docs/traces"
