//! Guest events for the host's trace (ABI v5; layout and protocol in `shared_abi`'s
//! `events` module and docs/abi.md): each CPU appends to its own ring in the shared region,
//! the host drains it.
//!
//! Off unless the host asked for events when it accepted the region (`HostFlags::EVENTS`):
//! then every event site costs one relaxed load and a not-taken branch. When on, an event
//! costs a time stamp counter read ([`Platform::tsc`]: the host maps it to its own clock)
//! and a few stores, with interrupts off so that an interrupt
//! handler's event cannot interleave with the code's on the same ring.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::{EventKind, GuestEvent};

use crate::platform::Platform;
use crate::region;

/// Whether the host asked for events (a site whose arguments cost something to compute
/// tests this first).
#[inline]
pub fn on() -> bool {
    region::events_on()
}

/// Appends an event to the calling CPU's ring, if events are on.
#[inline]
pub fn emit<P: Platform>(kind: EventKind, a: u32, b: u64) {
    if on() {
        emit_on::<P>(kind, a, b);
    }
}

#[cold]
#[inline(never)]
fn emit_on<P: Platform>(kind: EventKind, a: u32, b: u64) {
    // Interrupts off: the ring is this CPU's, and a handler (or a task switch) between
    // reading `head` and storing it would write the same entry.
    let irqs = P::irqs_save();
    if let Some((ring, entries)) = region::event_ring(P::cpu().id()) {
        // SAFETY: `ring` is this CPU's ring in the live region, 64-byte aligned (the ABI's
        // ring size is a multiple of 64 bytes), followed by
        // `entries` events; only this CPU writes `head`, `dropped` and the entries, and only
        // atomically (`head`) or volatile (the rest); the host only writes `tail`.
        unsafe {
            let head_word = AtomicU64::from_ptr(addr_of_mut!((*ring).head));
            let tail_word = AtomicU64::from_ptr(addr_of_mut!((*ring).tail));
            let head = head_word.load(Ordering::Relaxed);
            // Acquire: the host has copied the entries it consumed before we reuse them.
            let tail = tail_word.load(Ordering::Acquire);
            if head.wrapping_sub(tail) >= entries as u64 {
                let dropped = addr_of_mut!((*ring).dropped);
                write_volatile(dropped, read_volatile(dropped).wrapping_add(1));
            } else {
                let slot = ring
                    .add(1)
                    .cast::<GuestEvent>()
                    .add((head % entries as u64) as usize);
                write_volatile(
                    slot,
                    GuestEvent {
                        tsc: P::tsc(),
                        kind: kind as u16,
                        reserved: 0,
                        a,
                        b,
                    },
                );
                // Release: the host that sees the new head sees the entry.
                head_word.store(head.wrapping_add(1), Ordering::Release);
            }
        }
    }
    P::irqs_restore(irqs);
}
