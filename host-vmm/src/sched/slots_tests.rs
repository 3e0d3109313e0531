//! The slot backend's threads around the core: what happens when its ticker fails.

use std::sync::mpsc;

use super::*;
use crate::policy::NoBoost;

/// A VM whose shared region cannot be read without a panic (a stand-in for a bug in the
/// ticker's look).
#[derive(Default)]
struct BrokenView {
    stopped: Mutex<Option<String>>,
}

impl GuestView for BrokenView {
    fn snapshot(&self) -> Option<Result<Snapshot, ()>> {
        panic!("a bug in the ticker's look (on purpose)");
    }
    fn publish_host(&self, _: u32, _: bool, _: u64, _: u64) {}
    fn publish_lent_by(&self, _: u32, _: u32) {}
    fn backend_failed(&self, reason: &str) {
        *self.stopped.lock().unwrap() = Some(reason.to_string());
    }
}

struct NoKick;

impl Kick for NoKick {
    fn kick(&self) {}
}

/// A failing ticker neither ends the process nor leaves a vCPU waiting: the waiting vCPU is
/// released, the VM is told to stop, and `shutdown` returns the error.
#[test]
fn a_failed_ticker_stops_the_vms_and_is_reported() {
    let b = SlotBackend::new(CoreConfig {
        slots: 1,
        pin_slots: false,
        ..CoreConfig::default()
    })
    .unwrap();
    let view = Arc::new(BrokenView::default());
    let weak: Weak<dyn GuestView> = Arc::downgrade(&view) as Weak<dyn GuestView>;
    let h = b.add_vm(Box::new(NoBoost), 2, weak);
    // vCPU 0 takes the only slot and never gives it up (it cannot be kicked); vCPU 1
    // waits for a turn on its own thread.
    b.start(h.first, Box::new(NoKick));
    b.wait_turn(h.first);
    let (done, waited) = mpsc::channel();
    let b1 = Arc::clone(&b);
    std::thread::spawn(move || {
        b1.start(h.first + 1, Box::new(NoKick));
        b1.wait_turn(h.first + 1);
        let _ = done.send(());
    });
    waited
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting vCPU is released");
    // A waiter's own recheck may see the failure before the VM is told: wait for that.
    let deadline = Instant::now() + Duration::from_secs(10);
    while view.stopped.lock().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        view.stopped.lock().unwrap().as_deref(),
        Some("the slot scheduler's ticker failed")
    );
    assert!(matches!(b.shutdown(), Err(SchedError::TickerFailed)));
}
