//! Kernel context switch (switch.S): callee-saved registers on the outgoing stack, its stack
//! pointer saved, the incoming one loaded.

extern "C" {
    fn switch_context(prev_rsp: *mut u64, next_rsp: u64);
    fn task_trampoline();
}

/// Words of the frame a fresh stack starts with (see [`initial_frame`]).
pub const INITIAL_FRAME_WORDS: usize = 7;

/// The frame to put at the (16-byte aligned) top of a fresh kernel stack so that the first
/// [`switch`] to it calls `entry`: r15, r14, r13, r12 (= `entry`), rbx, rbp, then the return
/// address (task_trampoline, which calls r12 on an aligned stack).
pub fn initial_frame(entry: extern "C" fn() -> !) -> [u64; INITIAL_FRAME_WORDS] {
    [
        0,
        0,
        0,
        entry as usize as u64,
        0,
        0,
        task_trampoline as *const () as u64,
    ]
}

/// Saves the current context's stack pointer in `*prev_rsp` and continues the context saved
/// at `next_rsp`; returns when something switches back to the saved one. The interrupt flag
/// is the caller's business.
///
/// # Safety
/// `prev_rsp` must be valid for a write and stay where the next switch back reads it from;
/// `next_rsp` must be a stack pointer saved by an earlier `switch` (or the top of a stack
/// holding an [`initial_frame`]) of a context that is not running anywhere, whose stack
/// stays alive while it runs.
pub unsafe fn switch(prev_rsp: *mut u64, next_rsp: u64) {
    // SAFETY: per the contract.
    unsafe { switch_context(prev_rsp, next_rsp) }
}
