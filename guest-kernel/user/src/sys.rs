//! System calls from Rust user code: `int3` with the number in rax, arguments in rdi and
//! rsi, the result in rax (SYSCALL and `int $n`, n != 3, fault in guest user mode on the
//! nested hosts this runs on; see the kernel's `user.rs`). The numbers below 16 are the
//! kernel's general calls (`user.rs`), from 16 on the workloads' own.

pub const SYS_YIELD: u64 = 0;
pub const SYS_EXIT: u64 = 1;
pub const SYS_WRITE: u64 = 2;
pub const SYS_TIME: u64 = 6;
/// The first number the kernel hands to a workload's handler.
pub const SYS_WORKLOAD_FIRST: u64 = 16;
/// pbzip2: report the previous block, unmap its window, map the next (see `pbzip2`).
pub const SYS_PBZIP2_NEXT: u64 = 16;

/// One system call with two arguments.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn syscall2(nr: u64, a0: u64, a1: u64) -> u64 {
    let ret: u64;
    // SAFETY: `int3` from user mode enters the kernel's system-call trap, which reads rax,
    // rdi and rsi, writes rax and returns to the next instruction with every other
    // register restored (the trap frame saves all general registers). It touches no memory
    // of this program but what the call's contract names.
    unsafe {
        core::arch::asm!(
            "int3",
            inlateout("rax") nr => ret,
            in("rdi") a0,
            in("rsi") a1,
            options(nostack),
        );
    }
    ret
}

/// Ends the task with `code`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn exit(code: u64) -> ! {
    syscall2(SYS_EXIT, code, 0);
    // The kernel never returns from exit; should it, fault rather than run on.
    loop {
        // SAFETY: `ud2` raises #UD, which kills a user task; nothing else happens.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}

/// Writes `msg` (at most 256 bytes) to the kernel console; returns the bytes written or an
/// error value (`u64::MAX`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn write(msg: &[u8]) -> u64 {
    syscall2(SYS_WRITE, msg.as_ptr() as u64, msg.len() as u64)
}
