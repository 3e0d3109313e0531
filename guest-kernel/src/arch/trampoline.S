/*
 * Real-mode start for application processors. Copied by the BSP to {tramp_base}
 * (SIPI vector {tramp_base} >> 12); an AP starts here with CS = {tramp_base} >> 4, IP = 0.
 * It loads the boot GDT, enters protected mode and joins the BSP's path at
 * enter_long_mode_32 with the kernel's page tables (ap_boot_cr3) and %ebp = 0xffffffff.
 */
.section .text.trampoline, "ax"
.code16
.global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_ptr - ap_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, ${tramp_base} + (tramp32 - ap_trampoline_start)

.code32
tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0xffffffff, %ebp
    mov ap_boot_cr3, %eax
    /* Absolute: this code runs from its copy, so a relative jump would miss. */
    mov $enter_long_mode_32, %ecx
    jmp *%ecx

.p2align 2
tramp_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
.global ap_trampoline_end
ap_trampoline_end:
