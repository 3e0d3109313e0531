//! User mode: user tasks running the programs of user.S, the system calls (`int3`: on the
//! nested hosts this runs on, SYSCALL and `int $n` other than 3 fault in guest user mode),
//! and what happens on every crossing between user and kernel mode (the host sees the mode;
//! RCU sees user mode as an extended quiescent state).
//!
//! `arch::idt` reaches this module through the handlers [`install_trap_handlers`] registers:
//! the crossing hooks, the system-call trap and user exceptions.

use alloc::sync::Arc;
use alloc::vec::Vec;
use shared_abi::VcpuMode;
use x86_64::instructions::interrupts;
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use crate::arch::hook::Hook;
use crate::arch::idt::{self, TrapFrame};
use crate::arch::tsc;
use crate::mm::aspace::{AddressSpace, MapZeroedError, USER_START};
use crate::mm::frame;
use crate::sched::{self, Task};
use crate::{println, rcu, shared, tlb};

pub use crate::arch::user::Program;

/// Where user.S is mapped in every user address space.
pub const USER_CODE_VA: u64 = USER_START;
/// User stacks: one page each, a guard page apart, from here.
pub const USER_STACKS_VA: u64 = USER_START + 0x1000_0000;
/// Free for programs' own pages (the generic map, unmap and protect calls reach these).
pub const USER_DATA_VA: u64 = USER_START + 0x2000_0000;
/// From here up, workloads' own windows, which only their own system calls change (a user
/// program that could unmap a window would hand the workload's frames to the allocator
/// while the workload still maps them).
pub const USER_WORKLOAD_VA: u64 = USER_START + 0x4000_0000;

pub const SYS_YIELD: u64 = 0;
pub const SYS_EXIT: u64 = 1;
pub const SYS_WRITE: u64 = 2;
pub const SYS_MAP: u64 = 3;
pub const SYS_UNMAP: u64 = 4;
pub const SYS_PROTECT: u64 = 5;
pub const SYS_TIME: u64 = 6;
/// Error results (as u64): bad argument, no memory.
pub const EINVAL: u64 = u64::MAX;
pub const ENOMEM: u64 = u64::MAX - 1;
/// System calls from this number on go to the workload's handler
/// ([`set_workload_syscall`]; `pvsync_user::sys` numbers them).
pub const SYS_WORKLOAD_FIRST: u64 = pvsync_user::sys::SYS_WORKLOAD_FIRST;
/// Longest write a task may make at once.
const WRITE_MAX: usize = 256;

/// The running workload's system calls (`nr >= SYS_WORKLOAD_FIRST`): `f(nr, a0, a1)`,
/// called like the others (interrupts on, in the calling task). Default: EINVAL.
static WORKLOAD_SYSCALL: Hook<fn(u64, u64, u64) -> u64> = Hook::new();

/// Installs the handler of the workload's own system calls (before its tasks start).
pub fn set_workload_syscall(f: fn(u64, u64, u64) -> u64) {
    WORKLOAD_SYSCALL.set(f);
}

/// Registers the crossing hooks, the system-call trap and the user-exception handler with
/// `arch::idt` (once, on the BSP, before any user task runs).
pub fn install_trap_handlers() {
    idt::set_user_mode_hooks(kernel_entry, kernel_exit);
    idt::set_syscall_handler(syscall_trap);
    idt::set_user_exception_handler(user_exception);
}

/// The user address of a program of user.S.
pub fn program_va(program: Program) -> u64 {
    USER_CODE_VA + program.offset()
}

/// Maps user.S's pages (read-only, executable) into `aspace`.
pub fn map_programs(aspace: &AddressSpace) {
    let (start, end) = crate::arch::user::text();
    for pa in (start..end).step_by(4096) {
        let f = PhysFrame::containing_address(PhysAddr::new(pa));
        aspace
            .map(USER_CODE_VA + (pa - start), f, false, true)
            .expect("mapping user programs");
    }
}

/// A fresh zeroed frame mapped at `va` in `aspace`; returns its physical address, or the
/// system call's error (ENOMEM, EINVAL).
pub fn map_zeroed(aspace: &AddressSpace, va: u64, writable: bool) -> Result<u64, u64> {
    aspace.map_zeroed(va, writable).map_err(|e| match e {
        MapZeroedError::NoMemory => ENOMEM,
        MapZeroedError::Mapping => EINVAL,
    })
}

/// Starts a user task on `cpu` running `program(arg0, arg1)` in `aspace`, with stack slot
/// `stack_slot`. Panics if there is no room for it; see [`try_spawn`].
pub fn spawn(
    cpu: u32,
    name: &'static str,
    aspace: Arc<AddressSpace>,
    program: Program,
    arg0: u64,
    arg1: u64,
    stack_slot: u64,
) -> Arc<Task> {
    try_spawn(cpu, name, aspace, program, arg0, arg1, stack_slot, || {})
        .unwrap_or_else(|e| panic!("starting user task '{name}': {e}"))
}

/// Like [`spawn`], but no frame for the user stack or no heap for the kernel stack is an
/// error, not a panic; and the task runs `before` in the kernel before it enters user mode
/// (a suite's start gate).
#[allow(clippy::too_many_arguments)]
pub fn try_spawn(
    cpu: u32,
    name: &'static str,
    aspace: Arc<AddressSpace>,
    program: Program,
    arg0: u64,
    arg1: u64,
    stack_slot: u64,
    before: impl FnOnce() + Send + 'static,
) -> Result<Arc<Task>, &'static str> {
    let rip = program_va(program);
    let stack_va = USER_STACKS_VA + stack_slot * 2 * 4096;
    map_zeroed(&aspace, stack_va, true).map_err(|e| {
        if e == ENOMEM {
            "no free frame for its user stack"
        } else {
            "its user stack slot is taken"
        }
    })?;
    try_spawn_at(
        cpu,
        name,
        aspace,
        rip,
        stack_va + 4096,
        (arg0, arg1),
        before,
    )
}

/// Starts a user task on `cpu` entering user mode at `rip` with stack pointer `rsp` and
/// `args` in rdi and rsi, after running `before` in the kernel. The caller has mapped the
/// code at `rip` (user.S's pages, or the user image where it is linked) and the stack below
/// `rsp` in `aspace`.
pub fn try_spawn_at(
    cpu: u32,
    name: &'static str,
    aspace: Arc<AddressSpace>,
    rip: u64,
    rsp: u64,
    args: (u64, u64),
    before: impl FnOnce() + Send + 'static,
) -> Result<Arc<Task>, &'static str> {
    let t = Task::try_new(
        name,
        cpu,
        alloc::boxed::Box::new(move || {
            before();
            interrupts::disable();
            kernel_exit();
            // The task's address space is loaded (switch_in) and maps `rip` and the stack
            // below `rsp` (the caller's contract); interrupts stay off until iretq.
            sched::enter_user(rip, rsp, args.0, args.1)
        }),
        Some(aspace),
        false,
    )
    .map_err(|_| "no kernel heap for its kernel stack")?;
    sched::enqueue(t.clone());
    Ok(t)
}

/// On entry to the kernel from user mode (interrupts off).
fn kernel_entry() {
    rcu::exit_idle();
    shared::set_mode(VcpuMode::Kernel);
}

/// Right before returning to user mode (interrupts off).
fn kernel_exit() {
    shared::set_mode(VcpuMode::User);
    rcu::enter_idle();
}

/// An exception in user mode kills the task, not the kernel.
fn user_exception(frame: &mut TrapFrame) {
    kernel_entry();
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let t = sched::current();
    println!(
        "user task {} ({}) killed: vector {} error={:#x} rip={:#x} cr2={:#x}",
        t.id, t.name, frame.vector, frame.error_code, frame.rip, cr2
    );
    drop(t);
    interrupts::enable();
    sched::exit(128 + frame.vector)
}

/// Copies up to WRITE_MAX bytes from user memory.
fn copy_from_user(aspace: &AddressSpace, va: u64, len: u64) -> Option<Vec<u8>> {
    if len as usize > WRITE_MAX {
        return None;
    }
    aspace.read_user(va, len as usize)
}

fn page_arg(va: u64) -> Option<u64> {
    (va.is_multiple_of(4096) && (USER_DATA_VA..USER_WORKLOAD_VA).contains(&va)).then_some(va)
}

fn syscall(nr: u64, a0: u64, a1: u64) -> u64 {
    let me = sched::current();
    let Some(aspace) = me.aspace.clone() else {
        return EINVAL;
    };
    match nr {
        SYS_YIELD => {
            sched::yield_now();
            0
        }
        SYS_EXIT => {
            drop((me, aspace));
            sched::exit(a0)
        }
        SYS_WRITE => match copy_from_user(&aspace, a0, a1) {
            Some(bytes) => {
                println!(
                    "[user {}] {}",
                    me.id,
                    core::str::from_utf8(&bytes).unwrap_or("<not utf-8>")
                );
                a1
            }
            None => EINVAL,
        },
        SYS_MAP => match page_arg(a0) {
            Some(va) => map_zeroed(&aspace, va, a1 != 0).map_or_else(|e| e, |_| 0),
            None => EINVAL,
        },
        SYS_UNMAP => match page_arg(a0).map(|va| aspace.update(va, None)) {
            Some(Ok(Some(old))) => {
                tlb::shootdown(&aspace, a0, 1);
                // SAFETY: unmapped, and shot down on every CPU that had the address space
                // loaded: no CPU can reach it any more (mm cannot free it itself: the
                // shootdown is the TLB layer's, above mm).
                unsafe { frame::free(old) };
                0
            }
            _ => EINVAL,
        },
        SYS_PROTECT => match page_arg(a0).map(|va| aspace.protect(va, a1 != 0)) {
            Some(Ok(())) => {
                tlb::shootdown(&aspace, a0, 1);
                0
            }
            _ => EINVAL,
        },
        SYS_TIME => tsc::now_ns().max(1),
        nr if nr >= SYS_WORKLOAD_FIRST => {
            drop((me, aspace));
            WORKLOAD_SYSCALL.get().map_or(EINVAL, |f| f(nr, a0, a1))
        }
        _ => EINVAL,
    }
}

/// `int3` from user mode (interrupts off): number in rax, arguments in rdi and rsi, result
/// in rax. The user task may be switched out inside (yield, waits).
fn syscall_trap(frame: &mut TrapFrame) {
    kernel_entry();
    interrupts::enable();
    frame.rax = syscall(frame.rax, frame.rdi, frame.rsi);
    interrupts::disable();
    kernel_exit();
}
