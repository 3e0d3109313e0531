/*
 * switch_context(prev_rsp: *mut u64 in %rdi, next_rsp: u64 in %rsi)
 * Saves the callee-saved registers on the current stack, stores the stack pointer through
 * %rdi, loads %rsi and restores the next task's registers. Everything else is caller-saved,
 * and the interrupt flag is the caller's business.
 */
.section .text
.code64
.global switch_context
switch_context:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rdi)
    mov %rsi, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

/* A new context's first "return" lands here (16-byte aligned stack), with its entry
 * function in %r12 (see context.rs: initial_frame). */
.global task_trampoline
task_trampoline:
    call *%r12
    ud2
