//! User-mode programs and the first entry into user mode.
//!
//! The programs are position-independent assembly in user.S, linked into their own
//! page-aligned `.user_text` section (between `__user_text_start` and `__user_text_end`),
//! which the kernel maps read-only at a user address. `enter_user` (user_entry.S) builds
//! an `iretq` frame to CPL 3.

extern "C" {
    static __user_text_start: u8;
    static __user_text_end: u8;
    static __user_image_start: u8;
    static __user_image_end: u8;
    fn enter_user(rip: u64, rsp: u64, arg0: u64, arg1: u64) -> !;
    fn user_selftest();
    fn user_tlb_reader();
    fn user_churn();
    fn user_spin_yield();
    fn user_spin_rounds();
}

/// A program of user.S (system calls: see `user.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `user_selftest(data_va)`: write, map/protect/unmap a page, read the clock, exit(0) or
    /// exit(failing step).
    SelfTest,
    /// `user_tlb_reader(watch_va, counters_va)`: reads `watch_va` until `counters[2] != 0`,
    /// counting poisoned reads in `counters[0]` and reads in `counters[1]`.
    TlbReader,
    /// `user_churn(scratch_va, counters_va)`: maps, touches and unmaps `scratch_va` until
    /// `counters[2] != 0`, counting rounds in `counters[1]`.
    Churn,
    /// `user_spin_yield(deadline_ns, spins)`: until the clock passes `deadline_ns`, spins
    /// `spins` iterations and yields; then exits with its rounds | 1 << 63.
    SpinYield,
    /// `user_spin_rounds(rounds, spins)`: `rounds` times spins `spins` (>= 1) iterations,
    /// without a system call; then exits with the rounds done.
    SpinRounds,
}

impl Program {
    /// Offset of the program's entry point from the start of `.user_text`.
    pub fn offset(self) -> u64 {
        let entry = match self {
            Program::SelfTest => user_selftest as *const () as usize,
            Program::TlbReader => user_tlb_reader as *const () as usize,
            Program::Churn => user_churn as *const () as usize,
            Program::SpinYield => user_spin_yield as *const () as usize,
            Program::SpinRounds => user_spin_rounds as *const () as usize,
        } as u64;
        entry - text().0
    }
}

/// Physical range [start, end) of `.user_text` (page-aligned; identity-mapped).
pub fn text() -> (u64, u64) {
    // Linker-script symbols: only their addresses are taken.
    (
        core::ptr::addr_of!(__user_text_start) as u64,
        core::ptr::addr_of!(__user_text_end) as u64,
    )
}

/// Physical (= linked) range [start, end) of the whole user image (linker.ld): `.user_text`
/// and the Rust user programs' code and read-only data, page-aligned, which user mode may
/// read and execute where they are linked.
pub fn image() -> (u64, u64) {
    // Linker-script symbols: only their addresses are taken.
    (
        core::ptr::addr_of!(__user_image_start) as u64,
        core::ptr::addr_of!(__user_image_end) as u64,
    )
}

/// Leaves the kernel for user mode at `rip` with stack pointer `rsp` and the program's
/// arguments `arg0`, `arg1` (rdi, rsi); general registers are cleared, interrupts get enabled
/// by the `iretq`. Never returns: the task comes back to the kernel only through traps.
///
/// # Safety
/// TSS.RSP0 must be the top of a kernel stack that belongs to the calling task and that
/// nothing else uses: every trap from user mode pushes its frame there, over whatever the
/// stack held.
pub unsafe fn enter(rip: u64, rsp: u64, arg0: u64, arg1: u64) -> ! {
    // The swapgs in enter_user must not be interrupted: an interrupt in between would run
    // the kernel with the user GS base.
    x86_64::instructions::interrupts::disable();
    // SAFETY: interrupts are off; RSP0 per the caller's contract. User mode cannot touch
    // kernel memory: the kernel's mappings are supervisor-only.
    unsafe { enter_user(rip, rsp, arg0, arg1) }
}
