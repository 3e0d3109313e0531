/*
 * enter_user(rip %rdi, rsp %rsi, arg0 %rdx, arg1 %rcx): first entry of a user task.
 * Interrupts are off; the iret frame enables them in user mode. General registers are
 * cleared so no kernel value leaks to user mode.
 */
.section .text
.code64
.global enter_user
enter_user:
    push ${user_ss}
    push %rsi
    push $0x202
    push ${user_cs}
    push %rdi
    mov %rdx, %rdi
    mov %rcx, %rsi
    xor %eax, %eax
    xor %edx, %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    xor %ebx, %ebx
    xor %ebp, %ebp
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    swapgs
    iretq
