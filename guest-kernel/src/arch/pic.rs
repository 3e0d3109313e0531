//! The legacy 8259 PICs. Firmware (SeaBIOS under QEMU `pc`) leaves them delivering the PIT
//! at vector 8 through LINT0, where it would look like a double fault. Remap them above the
//! exceptions and mask every line: the kernel uses only the local APIC.

use x86_64::instructions::port::Port;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;
/// Where the remapped (and masked) PIC vectors land, should one slip through.
pub const MASTER_BASE: u8 = 0x20;
pub const SLAVE_BASE: u8 = 0x28;

pub fn remap_and_mask() {
    let (mut mc, mut md) = (Port::<u8>::new(MASTER_CMD), Port::<u8>::new(MASTER_DATA));
    let (mut sc, mut sd) = (Port::<u8>::new(SLAVE_CMD), Port::<u8>::new(SLAVE_DATA));
    // SAFETY: the standard ICW1-ICW4 sequence on the PIC ports, which nothing else uses;
    // without a PIC the writes go nowhere.
    unsafe {
        mc.write(0x11); // ICW1: init, ICW4 follows
        sc.write(0x11);
        md.write(MASTER_BASE); // ICW2: vector base
        sd.write(SLAVE_BASE);
        md.write(0x04); // ICW3: slave on IRQ2
        sd.write(0x02);
        md.write(0x01); // ICW4: 8086 mode
        sd.write(0x01);
        md.write(0xff); // mask everything
        sd.write(0xff);
    }
}
