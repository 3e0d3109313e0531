/*
 * User programs, built into the kernel image and mapped into user address spaces. Only
 * RIP-relative addressing: the pages are mapped at a user address, not where they link.
 * Syscalls: rax = number, args in rdi, rsi, rdx; result in rax (see user.rs).
 */
.section .user_text, "ax"
.code64

/* user_selftest(data_va): write, map/protect/unmap a page, read the clock, exit(0) or
 * exit(failing step). */
.global user_selftest
user_selftest:
    mov %rdi, %r12                  /* a free user address for a page */
    lea hello_msg(%rip), %rdi
    mov $hello_len, %rsi
    mov $2, %eax                    /* write */
    int3
    cmp $hello_len, %rax
    mov $1, %edi
    jne 9f
    mov %r12, %rdi
    mov $1, %esi
    mov $3, %eax                    /* map(va, writable) */
    int3
    test %rax, %rax
    mov $2, %edi
    jnz 9f
    movq $0x5eed, (%r12)
    cmpq $0x5eed, (%r12)
    mov $3, %edi
    jne 9f
    mov %r12, %rdi
    xor %esi, %esi
    mov $5, %eax                    /* protect(va, read-only) */
    int3
    test %rax, %rax
    mov $4, %edi
    jnz 9f
    cmpq $0x5eed, (%r12)            /* still readable */
    mov $5, %edi
    jne 9f
    mov %r12, %rdi
    mov $4, %eax                    /* unmap(va) */
    int3
    test %rax, %rax
    mov $6, %edi
    jnz 9f
    mov $6, %eax                    /* time */
    int3
    test %rax, %rax
    mov $7, %edi
    jz 9f
    mov $0, %eax                    /* yield */
    int3
    xor %edi, %edi
9:  mov $1, %eax                    /* exit(rdi) */
    int3
    ud2

hello_msg:
    .ascii "hello from user mode"
.set hello_len, . - hello_msg

/* user_tlb_reader(watch_va, counters_va): read watch_va until counters[2] != 0; a value
 * with bit 63 set (poison) is a stale translation: counters[0] += 1; counters[1] counts
 * reads. */
.global user_tlb_reader
user_tlb_reader:
1:  mov (%rdi), %rax
    bt $63, %rax
    jnc 2f
    incq (%rsi)
2:  incq 8(%rsi)
    cmpq $0, 16(%rsi)
    je 1b
    xor %edi, %edi
    mov $1, %eax
    int3
    ud2

/* user_churn(scratch_va, counters_va): map, touch and unmap scratch_va until counters[2] != 0;
 * every unmap shoots down the other CPUs of the address space. counters[1] counts rounds. */
.global user_churn
user_churn:
    mov %rdi, %r12
    mov %rsi, %r13
1:  mov %r12, %rdi
    mov $1, %esi
    mov $3, %eax
    int3
    test %rax, %rax
    jnz 8f
    movq $1, (%r12)
    mov %r12, %rdi
    mov $4, %eax
    int3
    test %rax, %rax
    jnz 8f
    incq 8(%r13)
    cmpq $0, 16(%r13)
    je 1b
    xor %edi, %edi
    jmp 9f
8:  mov $1, %edi
9:  mov $1, %eax
    int3
    ud2

/* user_spin_yield(deadline_ns, spins): until the clock passes deadline_ns, spin `spins`
   iterations in user mode and yield; then exit(rounds | 1 << 63). (rcutorture's user task
   beside the readers of a CPU.) */
.global user_spin_yield
user_spin_yield:
    mov %rdi, %r12
    mov %rsi, %r13
    xor %r14d, %r14d
2:  inc %r14
    mov %r13, %rcx
3:  dec %rcx
    jnz 3b
    xor %eax, %eax
    int3
    mov $6, %eax
    int3
    cmp %r12, %rax
    jb 2b
    mov %r14, %rdi
    bts $63, %rdi
    mov $1, %eax
    int3
    ud2

/* user_spin_rounds(rounds, spins): `rounds` times, spin `spins` (>= 1) iterations, with no
   system call at all; then exit(rounds done). (cpu-bound's worker.) */
.global user_spin_rounds
user_spin_rounds:
    xor %r14d, %r14d
1:  cmp %rdi, %r14
    jae 3f
    mov %rsi, %rcx
2:  dec %rcx
    jnz 2b
    inc %r14
    jmp 1b
3:  mov %r14, %rdi
    mov $1, %eax
    int3
    ud2
