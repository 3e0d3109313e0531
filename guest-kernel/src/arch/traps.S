/*
 * One 16-byte stub per vector: push a zero error code where the CPU pushes none, push the
 * vector, and jump to the common path, which saves every general register into a TrapFrame
 * and calls trap_dispatch(frame).
 */
.section .text.traps, "ax"
.code64
.p2align 4
.global trap_stubs
trap_stubs:
.set vector, 0
.rept 256
    .p2align 4
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp trap_common
.set vector, vector + 1
.endr

trap_common:
    /* From user mode (CS.RPL = 3, CS at 24(%rsp) here): switch to the kernel GS base. */
    testb $3, 24(%rsp)
    jz 1f
    swapgs
1:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call trap_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp                   /* vector and error code */
    testb $3, 8(%rsp)               /* back to user mode: restore the user GS base */
    jz 2f
    swapgs
2:
    iretq
