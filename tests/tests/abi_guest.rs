//! A second, independent guest (`tests/abi-guest/guest.S`: 32-bit assembly written from
//! docs/abi.md alone, sharing no code with the guest kernel or the ABI crate) registers
//! (ABI 6, after a hostile header the host must refuse with BadGeometry), publishes records
//! and vCPU bitmaps and makes every hypercall, checking each status the document promises
//! (it exits 1 on the first that differs). Here the host's side is checked: that it decoded
//! what the guest wrote (the bitmaps at the offsets its header names) and that the policies
//! acted on it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use pvsync_tests::{field, num, pvsync, require_kvm, workspace_root};
use serde_json::Value;

/// Assembles and links the guest with binutils (`as`, `ld`: part of the C toolchain Rust
/// links host code with), once per test process.
fn abi_guest() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let src = workspace_root().join("tests/abi-guest");
        let out = std::env::temp_dir().join(format!("pvsync-abi-guest-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let (obj, image) = (out.join("guest.o"), out.join("abi-guest"));
        let run = |cmd: &mut Command| {
            let what = format!("{cmd:?}");
            let st = cmd
                .status()
                .unwrap_or_else(|e| panic!("{what}: {e} (binutils `as` and `ld` are needed)"));
            assert!(st.success(), "{what} failed: {st}");
        };
        run(Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&obj)
            .arg(src.join("guest.S")));
        run(Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "--no-warn-rwx-segments",
                "-T",
            ])
            .arg(src.join("link.ld"))
            .arg("-o")
            .arg(&image)
            .arg(&obj));
        image
    })
}

/// Runs the guest on `vcpus` vCPUs and one slot (so a vCPU it names is queued) with `pv`;
/// returns the console, the metrics and the dump of the region at the end.
fn run(vcpus: u32) -> (pvsync_tests::Output, Value) {
    let metrics = std::env::temp_dir().join(format!(
        "pvsync-abi-guest-{vcpus}-{}.json",
        std::process::id()
    ));
    let image = abi_guest().to_str().unwrap().to_owned();
    let n = vcpus.to_string();
    let out = pvsync(&[
        "run",
        "--kernel",
        &image,
        "--vcpus",
        &n,
        "--slots",
        "1",
        "--mem",
        "64",
        "--policy",
        "pv",
        "--timeout",
        "60",
        "--dump-shared",
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    out.check(out.status == Some(0), "every status was the documented one");
    let m = std::fs::read_to_string(&metrics)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&metrics);
    out.check(m.is_object(), "metrics written");
    (out, m)
}

fn vcpu(m: &Value, i: usize) -> &Value {
    &m["vms"][0]["vcpus"][i]
}

fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .or_else(|| v["boosts"][key].as_u64())
        .unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn an_independent_guest_is_decoded_and_boosted() {
    if !require_kvm("an_independent_guest_is_decoded_and_boosted") {
        return;
    }
    let (out, m) = run(3);
    let result = out
        .line("RESULT abi-guest")
        .expect("the guest's result line");
    assert_eq!(num(result, "vcpus"), 3, "it found the VM's vCPU count");
    let yields = num(result, "yields");
    assert!(yields > 0);
    // What the host wrote into record 1 (host_boosts) is what the guest read back.
    assert!(num(result, "host_boosts") > 0, "{result}");

    // The host decoded every hypercall from vCPU 0.
    let v0 = vcpu(&m, 0);
    assert_eq!(count(v0, "yields"), yields, "every YieldTo counted");
    assert_eq!(count(v0, "rcu_waits"), 1);
    assert_eq!(count(v0, "halts"), 3, "three Idle");
    assert_eq!(
        count(v0, "ipis_sent"),
        3,
        "SendIpi to 1, then to all but itself"
    );
    // Refused: version, count 1 and 2, the hostile geometry (BadGeometry at count 3), the
    // second registration, YieldTo(3), SendIpi to vCPU 256, vector 5.
    assert_eq!(count(v0, "bad_hypercalls"), 8);
    assert_eq!(
        (
            count(vcpu(&m, 1), "ipis_received"),
            count(vcpu(&m, 2), "ipis_received")
        ),
        (2, 1)
    );
    assert_eq!(
        m["vms"][0]["invalid_page_events"], 0,
        "its records are valid"
    );
    assert_eq!(m["audit"]["guest_reads_under_scheduler_lock"], 0);

    // The policies acted on it: the named holder, and the readers the grace period waits on
    // (from the records' rcu_nesting).
    assert!(count(vcpu(&m, 1), "named-by-spinner") > 0);
    let readers = count(vcpu(&m, 1), "rcu-reader") + count(vcpu(&m, 2), "rcu-reader");
    assert!(readers > 0, "the grace period's readers were boosted");

    // The region as the host decoded it at the end.
    let all = out.all();
    let header = all
        .lines()
        .find(|l| l.starts_with("shared region "))
        .expect("region dumped");
    assert_eq!(field(header, "abi"), Some("6"));
    assert_eq!(field(header, "vcpus"), Some("3"));
    assert_eq!(field(header, "size"), Some("4096"));
    assert_eq!(field(header, "rcu_gp_seq"), Some("1"));
    assert_eq!(field(header, "rcu_callbacks_pending"), Some("5000"));
    // The holdout bitmap, at the offset the header names.
    assert_eq!(field(header, "rcu_gp_holdouts"), Some("1-2"), "{header}");
    assert_eq!(field(header, "invalid_records"), Some("0"));
    // vCPU 0 waits on the others' acknowledgements, each of them on vCPU 0's: every
    // ipi_wait bitmap decoded at P + B * i.
    let rec0 = record(&all, 0);
    assert_eq!(field(rec0, "ipi_wait"), Some("1-2"), "{rec0}");
    assert_eq!(field(rec0, "problems"), Some("none"), "{rec0}");
    for i in 1..3 {
        let rec = record(&all, i);
        for (k, want) in [
            ("mode", "kernel"),
            ("rcu_nesting", "1"),
            ("preempt_count", "1"),
            ("locks_held", "1"),
            ("spin_holder", "none"),
            ("ipi_wait", "0"),
            ("problems", "none"),
        ] {
            assert_eq!(field(rec, k), Some(want), "{rec}");
        }
    }
}

/// Record `i`'s line in the dump of the region.
fn record(all: &str, i: usize) -> &str {
    all.lines()
        .find(|l| l.starts_with(&format!("shared vcpu={i} ")))
        .expect("record dumped")
}

#[test]
fn an_independent_guest_alone_on_one_vcpu() {
    if !require_kvm("an_independent_guest_alone_on_one_vcpu") {
        return;
    }
    let (out, m) = run(1);
    let result = out
        .line("RESULT abi-guest")
        .expect("the guest's result line");
    assert_eq!(num(result, "vcpus"), 1);
    assert_eq!(num(result, "yields"), 0, "nobody to name");
    // Refused: the version, the hostile geometry (BadGeometry at once), the second
    // registration, YieldTo(1), SendIpi to vCPU 256, vector 5.
    assert_eq!(count(vcpu(&m, 0), "bad_hypercalls"), 6);
    // Nobody else: no holdouts, no IPI wait.
    let all = out.all();
    let header = all
        .lines()
        .find(|l| l.starts_with("shared region "))
        .expect("region dumped");
    assert_eq!(field(header, "rcu_gp_holdouts"), Some("-"), "{header}");
    assert_eq!(field(header, "invalid_records"), Some("0"));
    assert_eq!(field(record(&all, 0), "ipi_wait"), Some("-"));
}
