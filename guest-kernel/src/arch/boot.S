/*
 * PVH entry: the loader jumps to pvh_start32 in 32-bit protected mode, paging off,
 * %ebx = physical address of struct hvm_start_info. We zero .bss (the kernel, not the
 * loader, owns that), identity-map the first 4 GiB with 2 MiB pages, enter long mode and
 * call kernel_main_bsp(start_info).
 */

/* ---- ELF notes (one PT_NOTE segment, see linker.ld) ---- */
.section .note.pvh, "a"
.p2align 2
    /* XEN_ELFNOTE_PHYS32_ENTRY: 8-byte descriptor, as QEMU reads ELF64 notes as a quad. */
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32
    .p2align 2
    /* pvsync ABI version, read by the VMM before it boots us. */
    .long 7
    .long 4
    .long {note_type_abi}
    .asciz "PVSYNC"
    .p2align 2
    .long {abi_version}
    .p2align 2

/* ---- boot-time GDT, also used by the AP trampoline ---- */
.section .data.boot_gdt, "aw"
.p2align 4
.global boot_gdt
boot_gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
    .quad 0x00cf9a000000ffff        /* 0x18: 32-bit code */
.global boot_gdt_end
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

/* ---- boot page tables and stack (zeroed with the rest of .bss) ---- */
.section .bss.boot, "aw", @nobits
.p2align 12
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096                  /* 4 x 512 x 2 MiB = 4 GiB */
.p2align 4
boot_stack:
    .skip {boot_stack_size}
boot_stack_top:

.section .text.boot, "ax"
.code32
.global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %ebp                  /* keep start info; rep stos clobbers the rest */

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    mov $boot_stack_top, %esp
    lgdt boot_gdt_ptr

    /* PML4[0] -> PDPT, PDPT[0..4] -> PD0..PD3 */
    mov $boot_pdpt, %eax
    or $0x3, %eax                   /* present | writable */
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    loop 1b

    /* 2048 PD entries: identity 2 MiB pages (present | writable | page size) */
    mov $boot_pd, %edi
    mov $0x83, %eax
    mov $2048, %ecx
2:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 2b

    mov $boot_pml4, %eax
    jmp enter_long_mode_32

/*
 * Shared by the BSP and the AP trampoline: %eax = PML4 address.
 * Enables PAE, EFER.LME|NXE, paging, and far-jumps to long_mode_64.
 */
.global enter_long_mode_32
enter_long_mode_32:
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                  /* CR4.PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx           /* IA32_EFER */
    rdmsr
    or $0x900, %eax                 /* LME | NXE */
    wrmsr
    /* Write CR0 whole: an AP comes out of INIT with CD|NW set (caches off). */
    mov $0x80010033, %eax           /* PG | WP | NE | ET | MP | PE */
    mov %eax, %cr0
    ljmp $0x08, $long_mode_64

.code64
long_mode_64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    /* The BSP arrives with %ebp = start info; APs arrive with %ebp = 0xffffffff. */
    cmp $0xffffffff, %ebp
    je ap_long_mode
    mov $boot_stack_top, %rsp
    mov %ebp, %edi                  /* zero-extends: start info physical address */
    xor %ebp, %ebp
    call kernel_main_bsp
3:  cli
    hlt
    jmp 3b

/*
 * An AP finds its stack by its initial APIC ID: the x2APIC ID (CPUID.0xB:EDX) where the
 * CPU has leaf 0xB (maximum basic leaf >= 0xB and CPUID.0xB:EBX[15:0] non-zero), else
 * CPUID.1:EBX[31:24], which holds only 8 bits (apic::initial_apic_id does the same).
 * It takes its entry of ap_stack_tops ({nr_cpus} of them), leaving 0: an ID past the
 * table, an entry without a stack, or one already taken (two CPUs past 255 read the same
 * 8-bit ID where leaf 0xB is missing) halts the AP rather than share a stack.
 */
ap_long_mode:
    xor %eax, %eax
    cpuid
    cmp $0xb, %eax
    jb 5f
    mov $0xb, %eax
    xor %ecx, %ecx
    cpuid
    test $0xffff, %ebx
    jz 5f
    mov %edx, %ebx                  /* zero-extends into %rbx */
    jmp 6f
5:  mov $1, %eax
    cpuid
    shr $24, %ebx
6:  cmp ${nr_cpus}, %ebx
    jae 4f
    mov %ebx, %edi                  /* first argument: APIC ID */
    lea ap_stack_tops(%rip), %rax
    xor %ecx, %ecx
    xchg %rcx, (%rax,%rbx,8)        /* atomic: one AP takes each stack */
    mov %rcx, %rsp
    test %rsp, %rsp
    jz 4f
    xor %ebp, %ebp
    call ap_entry
4:  cli
    hlt
    jmp 4b
