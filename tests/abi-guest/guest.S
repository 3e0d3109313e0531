/*
 * abi-guest: a second pvsync guest, written from docs/abi.md alone (it shares no code with
 * guest-kernel/ or shared-abi/). 32-bit protected mode, no paging, no interrupts: the PVH
 * entry hands us flat 4 GiB segments, which is all the protocol needs. ABI version 6: the
 * header names the offsets of the vCPU bitmaps (holdouts, one ipi_wait per vCPU) and of the
 * rings (none here), all computed from nr_vcpus (docs/abi.md, section 2).
 *
 * What it does, each step checked against the status the document promises:
 *  1. registers a region whose header carries ABI version 5: VersionMismatch (3);
 *  2. finds the VM's vCPU count with a hostile header, one whose ipi_wait_offset points
 *     past the region: nr_vcpus = 1, 2, ... is BadVcpuCount (4) until the count is the
 *     VM's, where it is BadGeometry (5); then the header for that count as the ABI computes
 *     it: Ok (0) with host_flags.ACCEPTED set; a second registration: AlreadyRegistered (7);
 *  3. starts every other vCPU (x2APIC INIT-SIPI-SIPI through a real-mode trampoline); each
 *     publishes its record: mode kernel in a seq frame, then rcu_nesting, preempt_count and
 *     locks_held = 1 as single stores, then that it waits for an IPI acknowledgement from
 *     vCPU 0 (bit 0 of its own ipi_wait bitmap, then ipi_wait_count = 1; nobody ever
 *     acknowledges), and spins forever;
 *  4. vCPU 0 publishes itself spinning on a lock vCPU 1 holds and makes YieldTo(1) many
 *     times (Ok), then YieldTo(nr_vcpus): BadVcpu (10);
 *  5. opens a grace period in the header (the holdout bitmap: every other vCPU; then
 *     rcu_gp_seq odd and a backlog) and makes RcuWait (Ok);
 *  6. publishes that it waits for IPI acknowledgements from every other vCPU (its ipi_wait
 *     bitmap, then ipi_wait_count; they never acknowledge: interrupts stay masked), then
 *     SendIpi to vCPU 1 and to all but itself (Ok), to vCPU 256 (a 16-bit id the VM lacks):
 *     BadVcpu (10), and a malformed one (vector 5): BadArgument (11);
 *  7. Idle for 1 ms, three times (Ok). This guest keeps interrupts masked throughout (it
 *     has no IDT), so it makes Idle with IF=0: docs/abi.md asks for IF=1 so that a pending
 *     interrupt is taken on return without an interrupt-window exit, which does not apply
 *     to a guest that takes no interrupts;
 *  8. prints "RESULT abi-guest vcpus=N yields=Y host_boosts=B" (B: record 1's host_boosts,
 *     what the host wrote back) and exits with code 0 through the Exit port. A failed step
 *     prints "abi-guest: FAIL step S status X" and exits with code 1.
 * The grace period and the IPI waits stay published: the host's dump of the region at the
 * end shows what it decoded from the bitmaps.
 */

/* docs/abi.md, sections 2 and 4. REGION and TRAMPOLINE are RAM the pvsync VMM leaves free
 * (its memory map and boot data are below 0x8000 and at 0x20000; the image is at 1 MiB):
 * the ABI does not say where a guest puts its region, only that it is RAM. */
.set REGION,            0x200000        /* where the region lives (RAM, not the image) */
.set MAGIC_LO,          0x59535650      /* "PVSY" */
.set MAGIC_HI,          0x0000434e      /* "NC\0\0" */
.set ABI_VERSION,       6
.set OTHER_VERSION,     5               /* the previous one: refused */
.set HDR_VERSION,       8
.set HDR_NR_VCPUS,      12
.set HDR_REGION_SIZE,   16
.set HDR_RECORD_SIZE,   20
.set HDR_RECORDS_OFF,   24
.set HDR_HOST_FLAGS,    28
.set HDR_GP_SEQ,        32
.set HDR_CB_PENDING,    40
.set HDR_HOLDOUTS_OFF,  48
.set HDR_IPI_WAIT_OFF,  52
.set HDR_RING_ENTRIES,  56              /* 0: no event rings (zeroed, never written) */
.set HDR_RINGS_OFF,     60
.set REC_SEQ,           0
.set REC_MODE,          4
.set REC_RCU_NESTING,   8
.set REC_PREEMPT,       12
.set REC_LOCKS_HELD,    16
.set REC_SPIN_HOLDER,   20
.set REC_SPIN_LOCK,     24
.set REC_IPI_WAIT_COUNT, 32
.set REC_HOST_BOOSTS,   52
.set MODE_KERNEL,       2
.set NO_VCPU,           0xffffffff
.set PORT_EXIT,         0xf4
.set PORT_REGISTER,     0x500
.set PORT_YIELD_TO,     0x501
.set PORT_IDLE,         0x502
.set PORT_SEND_IPI,     0x503
.set PORT_RCU_WAIT,     0x504
.set ST_OK,             0
.set ST_VERSION,        3
.set ST_VCPU_COUNT,     4
.set ST_BAD_GEOMETRY,   5
.set ST_ALREADY,        7
.set ST_BAD_VCPU,       10
.set ST_BAD_ARGUMENT,   11

/* The machine: COM1, x2APIC MSRs, where the AP trampoline goes. */
.set COM1,              0x3f8
.set MSR_APIC_BASE,     0x1b
.set APIC_BASE_X2_EN,   0xc00           /* EXTD | EN */
.set MSR_X2APIC_ID,     0x802
.set MSR_X2APIC_ICR,    0x830
.set ICR_INIT,          0x4500
.set ICR_SIPI,          0x4600
.set TRAMPOLINE,        0x8000
.set YIELDS,            500
/* The counts step 2 tries, and what `scratch` holds. Only a bound on the search (the tests
 * run 1 and 3 vCPUs): offsets and sizes are computed from nr_vcpus. At 31 the region
 * (64 + 64*31 records + 32 one-line bitmaps) is exactly one page. */
.set MAX_VCPUS,         31

/* ---- ELF notes: Xen PVH entry (QEMU-style 8-byte descriptor) and the pvsync ABI note ---- */
.section .note, "a"
.p2align 2
    .long 4, 8, 18
    .asciz "Xen"
    .quad _start
    .long 7, 4, 1
    .asciz "PVSYNC"
    .byte 0
    .long ABI_VERSION

.section .text, "ax"
.code32
.global _start
_start:
    cli
    lgdt gdtr
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $stack_top, %esp

    /* 1. A header of another version is refused with VersionMismatch. */
    mov $1, %eax
    mov $OTHER_VERSION, %edx
    call fill_region
    call register
    mov $1, %edi
    mov $ST_VERSION, %ebx
    call expect

    /* 2. Find the VM's vCPU count with a header whose ipi_wait_offset points past the
     * region: every other count is BadVcpuCount, the VM's is BadGeometry. */
    xor %ecx, %ecx
2:  inc %ecx
    cmp $MAX_VCPUS, %ecx
    ja fail_count
    mov %ecx, %eax
    mov $ABI_VERSION, %edx
    push %ecx
    call fill_region
    mov geo_size, %eax
    mov %eax, REGION + HDR_IPI_WAIT_OFF /* hostile: the region's end */
    call register
    pop %ecx
    cmp $ST_VCPU_COUNT, %eax
    je 2b
    mov %ecx, nr_vcpus
    mov $2, %edi
    mov $ST_BAD_GEOMETRY, %ebx
    call expect
    mov nr_vcpus, %eax                  /* the header as the ABI computes it */
    mov $ABI_VERSION, %edx
    call fill_region
    call register
    mov $20, %edi
    mov $ST_OK, %ebx
    call expect
    mov $REGION + HDR_HOST_FLAGS, %esi
    mov (%esi), %eax
    and $1, %eax
    mov $21, %edi
    mov $1, %ebx                        /* ACCEPTED */
    call expect
    call register
    mov $22, %edi
    mov $ST_ALREADY, %ebx
    call expect

    /* 3. Start the other vCPUs. */
    call start_aps
    mov nr_vcpus, %ecx
    dec %ecx
3:  pause
    cmp ap_ready, %ecx
    jne 3b

    /* 4. Spin on a lock vCPU 1 holds, naming it. */
    mov $REGION + 64, %esi              /* record 0 */
    incl REC_SEQ(%esi)                  /* odd: update in progress */
    movb $MODE_KERNEL, REC_MODE(%esi)
    movl $lock_word, REC_SPIN_LOCK(%esi)
    movl $0, REC_SPIN_LOCK + 4(%esi)
    movl $1, REC_SPIN_HOLDER(%esi)
    incl REC_SEQ(%esi)                  /* even: done */
    cmpl $2, nr_vcpus
    jb 5f                               /* a one-vCPU VM has nobody to name */
    mov $YIELDS, %ecx
4:  push %ecx
    mov $PORT_YIELD_TO, %edx
    mov $1, %eax
    call hypercall
    mov $4, %edi
    mov $ST_OK, %ebx
    call expect
    incl yields
    pop %ecx
    loop 4b
5:  incl REC_SEQ(%esi)                  /* stop spinning, in a frame */
    movl $NO_VCPU, REC_SPIN_HOLDER(%esi)
    movl $0, REC_SPIN_LOCK(%esi)
    incl REC_SEQ(%esi)
    mov $PORT_YIELD_TO, %edx
    mov nr_vcpus, %eax                  /* no such vCPU */
    call hypercall
    mov $41, %edi
    mov $ST_BAD_VCPU, %ebx
    call expect

    /* 5. A grace period that waits on every other vCPU: the holdout bitmap first, then the
     * odd rcu_gp_seq (u64 header fields whose high halves stay zero: one aligned 32-bit
     * store each writes the whole value). */
    mov geo_holdouts, %edi
    add $REGION, %edi
    mov $1, %ebx                        /* bits 1 .. nr-1 */
    mov nr_vcpus, %esi
    call bitmap_set_range
    movl $5000, REGION + HDR_CB_PENDING
    movl $1, REGION + HDR_GP_SEQ        /* odd: in progress */
    mov $PORT_RCU_WAIT, %edx
    mov $1, %eax
    call hypercall
    mov $5, %edi
    mov $ST_OK, %ebx
    call expect

    /* 6. Interrupts through the host, after publishing the wait for their acknowledgements
     * (every other vCPU): the bitmap's words, then ipi_wait_count (x86 stores are release). */
    cmpl $2, nr_vcpus
    jb 6f
    xor %eax, %eax
    call ipi_wait_bitmap
    mov $1, %ebx                        /* bits 1 .. nr-1 */
    mov nr_vcpus, %esi
    call bitmap_set_range
    mov nr_vcpus, %eax
    dec %eax
    mov %eax, REGION + 64 + REC_IPI_WAIT_COUNT
    mov $PORT_SEND_IPI, %edx
    mov $(0x40 | (1 << 16)), %eax       /* vector 0x40 to vCPU 1 (bits 16..32) */
    call hypercall
    mov $6, %edi
    mov $ST_OK, %ebx
    call expect
6:  mov $PORT_SEND_IPI, %edx
    mov $(0x40 | (1 << 8)), %eax        /* all but self (bit 8) */
    call hypercall
    mov $61, %edi
    mov $ST_OK, %ebx
    call expect
    mov $PORT_SEND_IPI, %edx
    mov $(0x40 | (256 << 16)), %eax     /* vCPU 256: the VM has at most MAX_VCPUS */
    call hypercall
    mov $63, %edi
    mov $ST_BAD_VCPU, %ebx
    call expect
    mov $PORT_SEND_IPI, %edx
    mov $5, %eax                        /* vector below 32 */
    call hypercall
    mov $62, %edi
    mov $ST_BAD_ARGUMENT, %ebx
    call expect

    /* 7. Idle 1 ms, three times. */
    mov $3, %ecx
7:  push %ecx
    mov $PORT_IDLE, %edx
    mov $1000, %eax
    call hypercall
    mov $7, %edi
    mov $ST_OK, %ebx
    call expect
    pop %ecx
    loop 7b

    /* 8. Report what the host wrote back, and exit. */
    mov $msg_result, %esi
    call puts
    mov nr_vcpus, %eax
    call putdec
    mov $msg_yields, %esi
    call puts
    mov yields, %eax
    call putdec
    mov $msg_boosts, %esi
    call puts
    mov REGION + 64 + 64 + REC_HOST_BOOSTS, %eax
    call putdec
    mov $msg_nl, %esi
    call puts
    mov $PORT_EXIT, %edx
    xor %eax, %eax
    out %eax, %dx
    jmp halt

fail_count:
    mov $2, %edi
    mov $ST_VCPU_COUNT, %eax
    /* fall through */
fail:                                   /* %edi: step, %eax: status */
    push %eax
    mov $msg_fail, %esi
    call puts
    mov %edi, %eax
    call putdec
    mov $msg_status, %esi
    call puts
    pop %eax
    call putdec
    mov $msg_nl, %esi
    call puts
    mov $PORT_EXIT, %edx
    mov $1, %eax
    out %eax, %dx
halt:
    hlt
    jmp halt

/* %eax == %ebx, else fail at step %edi. */
expect:
    cmp %ebx, %eax
    jne 1f
    ret
1:  add $4, %esp
    jmp fail

/* out %eax to port %dx, then in the status from the same port into %eax. */
hypercall:
    out %eax, %dx
    in %dx, %eax
    ret

/* Registers REGION; the status in %eax. */
register:
    mov $PORT_REGISTER, %edx
    mov $REGION, %eax
    jmp hypercall

/* The region's geometry for %eax vCPUs without event rings (docs/abi.md, section 2), into
 * geo_*: W = ceil(n/64) words per bitmap, B = round_up(8W, 64) bytes from one bitmap to the
 * next, H = 64 + 64n (holdouts), P = H + B (vCPU 0's ipi_wait), R = H + B(n+1) (where the
 * rings would start), size = round_up(R, 4096). */
geometry:
    mov %eax, %ecx
    lea 63(%ecx), %ebx
    shr $6, %ebx
    mov %ebx, geo_words                 /* W */
    shl $3, %ebx
    add $63, %ebx
    and $-64, %ebx
    mov %ebx, geo_stride                /* B */
    lea 1(%ecx), %eax
    shl $6, %eax
    mov %eax, geo_holdouts              /* H */
    add %ebx, %eax
    mov %eax, geo_ipi_wait              /* P */
    lea 1(%ecx), %eax
    imul %ebx, %eax
    add geo_holdouts, %eax
    mov %eax, geo_rings                 /* R */
    add $4095, %eax
    and $-4096, %eax
    mov %eax, geo_size
    ret

/* Zeroes the region and writes a header for %eax vCPUs of ABI version %edx, its offsets as
 * the ABI computes them, every record's spin_holder NO_VCPU (docs/abi.md, section 5). */
fill_region:
    push %eax
    push %edx
    call geometry
    mov $REGION, %edi
    mov geo_size, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    pop %edx
    pop %eax
    mov $REGION, %edi
    movl $MAGIC_LO, 0(%edi)
    movl $MAGIC_HI, 4(%edi)
    mov %edx, HDR_VERSION(%edi)
    mov %eax, HDR_NR_VCPUS(%edi)
    mov geo_size, %edx
    mov %edx, HDR_REGION_SIZE(%edi)
    movl $64, HDR_RECORD_SIZE(%edi)
    movl $64, HDR_RECORDS_OFF(%edi)
    mov geo_holdouts, %edx
    mov %edx, HDR_HOLDOUTS_OFF(%edi)
    mov geo_ipi_wait, %edx
    mov %edx, HDR_IPI_WAIT_OFF(%edi)
    mov geo_rings, %edx
    mov %edx, HDR_RINGS_OFF(%edi)
    mov %eax, %ecx
    lea 64(%edi), %edi
1:  movl $NO_VCPU, REC_SPIN_HOLDER(%edi)
    add $64, %edi
    loop 1b
    ret

/* %edi: the address of vCPU %eax's ipi_wait bitmap, P + B * vcpu. */
ipi_wait_bitmap:
    imul geo_stride, %eax
    add geo_ipi_wait, %eax
    lea REGION(%eax), %edi
    ret

/* Makes the bitmap at %edi hold bits %ebx .. %esi-1 and no other: built in `scratch`, then
 * each of its geo_words words stored whole. Clobbers every register but %edi and %esp. */
bitmap_set_range:
    push %edi
    mov $scratch, %edi
    mov geo_words, %ecx
    shl $1, %ecx
    xor %eax, %eax
    rep stosl
    pop %edi
1:  cmp %esi, %ebx
    jae 2f
    bts %ebx, scratch
    inc %ebx
    jmp 1b
2:  xor %esi, %esi
3:  cmp geo_words, %esi
    jae 4f
    mov scratch(,%esi,8), %ebx
    mov scratch + 4(,%esi,8), %ecx
    lea (%edi,%esi,8), %ebp
    call store64
    inc %esi
    jmp 3b
4:  ret

/* The u64 at (%ebp) = %ecx:%ebx, in one atomic 64-bit write (lock cmpxchg8b until it takes:
 * no 64-bit plain store in 32-bit mode without SSE). Clobbers %eax, %edx. */
store64:
    mov (%ebp), %eax
    mov 4(%ebp), %edx
1:  lock cmpxchg8b (%ebp)
    jnz 1b
    ret

/* Copies the trampoline below 1 MiB and sends INIT, SIPI, SIPI to vCPUs 1 .. nr-1. */
start_aps:
    mov $trampoline, %esi
    mov $TRAMPOLINE, %edi
    mov $(trampoline_end - trampoline), %ecx
    rep movsb
    call x2apic_on
    mov $1, %ebx
1:  cmp nr_vcpus, %ebx
    jae 2f
    mov %ebx, %edx
    mov $ICR_INIT, %eax
    mov $MSR_X2APIC_ICR, %ecx
    wrmsr
    mov %ebx, %edx
    mov $(ICR_SIPI | (TRAMPOLINE >> 12)), %eax
    wrmsr
    mov %ebx, %edx
    wrmsr
    inc %ebx
    jmp 1b
2:  ret

x2apic_on:
    mov $MSR_APIC_BASE, %ecx
    rdmsr
    or $APIC_BASE_X2_EN, %eax
    wrmsr
    ret

/* An AP, in protected mode: publish its record, say so, spin. */
ap_main:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $MSR_APIC_BASE, %ecx
    rdmsr
    or $APIC_BASE_X2_EN, %eax
    wrmsr
    mov $MSR_X2APIC_ID, %ecx
    rdmsr                               /* %eax: our APIC ID = our record */
    mov %eax, %edi
    shl $6, %eax
    lea REGION + 64(%eax), %esi
    incl REC_SEQ(%esi)                  /* odd */
    movb $MODE_KERNEL, REC_MODE(%esi)
    incl REC_SEQ(%esi)                  /* even */
    movl $1, REC_RCU_NESTING(%esi)      /* single stores, outside the frame */
    movl $1, REC_PREEMPT(%esi)
    movl $1, REC_LOCKS_HELD(%esi)
    /* It waits for vCPU 0's acknowledgement: word 0 of its bitmap (P + B * id) = bit 0,
     * written whole as in store64 (no stack here), then ipi_wait_count = 1. */
    imul geo_stride, %edi
    add geo_ipi_wait, %edi
    lea REGION(%edi), %ebp
    mov $1, %ebx
    xor %ecx, %ecx
    mov (%ebp), %eax
    mov 4(%ebp), %edx
2:  lock cmpxchg8b (%ebp)
    jnz 2b
    movl $1, REC_IPI_WAIT_COUNT(%esi)
    lock incl ap_ready
1:  pause
    jmp 1b

/* Serial output: the NUL-terminated string at %esi; %eax in decimal. */
puts:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

putdec:
    mov $10, %ecx
    mov $decbuf_end, %edi
    movb $0, (%edi)
1:  xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %edi
    mov %dl, (%edi)
    test %eax, %eax
    jnz 1b
    mov %edi, %esi
    jmp puts

/* ---- The AP trampoline: copied to TRAMPOLINE, entered in real mode at TRAMPOLINE:0 ---- */
.code16
trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TRAMPOLINE + (tramp_gdtr - trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_main
.p2align 2
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
trampoline_end:
.code32

.section .rodata, "a"
msg_result: .asciz "RESULT abi-guest vcpus="
msg_yields: .asciz " yields="
msg_boosts: .asciz " host_boosts="
msg_fail:   .asciz "abi-guest: FAIL step "
msg_status: .asciz " status "
msg_nl:     .asciz "\n"
.p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: flat data */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

.section .data, "aw"
.p2align 2
nr_vcpus:   .long 0
/* The geometry fill_region last wrote (after step 2: the registered region's). */
geo_words:    .long 0
geo_stride:   .long 0
geo_holdouts: .long 0
geo_ipi_wait: .long 0
geo_rings:    .long 0
geo_size:     .long 0
ap_ready:   .long 0
yields:     .long 0
lock_word:  .long 0
decbuf:     .space 12
decbuf_end: .byte 0

.section .bss, "aw", @nobits
.p2align 4
scratch:    .space 8 * ((MAX_VCPUS + 63) / 64)  /* one bitmap's words */
stack:      .space 4096
stack_top:
