//! User tasks: what happens when user code takes an exception.

use crate::arch::idt::TrapFrame;
use crate::{println, sched};

/// An exception in user mode kills the task, not the kernel.
pub fn user_exception(frame: &mut TrapFrame) {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let t = sched::current();
    println!(
        "user task {} ({}) killed: vector {} error={:#x} rip={:#x} cr2={:#x}",
        t.id, t.name, frame.vector, frame.error_code, frame.rip, cr2
    );
    drop(t);
    sched::exit(128 + frame.vector)
}
