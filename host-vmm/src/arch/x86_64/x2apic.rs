//! x2APIC interrupt addressing for VMs past 255 vCPUs.
//!
//! An MSI's destination is 8 bits (address bits 12..20), and KVM by default reads 0xff as
//! broadcast. With `KVM_CAP_X2APIC_API` (`USE_32BIT_IDS`) KVM takes the destination's upper
//! 24 bits from the MSI's high address word, so every APIC ID up to 2^32 - 1 can be named;
//! `DISABLE_BROADCAST_QUIRK` makes 0xff an ordinary ID (vCPU 255) once every enabled local
//! APIC is in x2APIC mode (while one is still in xAPIC mode, KVM still reads 0xff as
//! broadcast; the pvsync guest turns x2APIC on in each CPU's bring-up).

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, KVM_CAP_X2APIC_API, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
    KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::VmFd;

/// Base of the MSI address window (the local APICs' fixed MSI address).
pub const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;
/// Shift of the low 8 destination bits in the low address word.
const MSI_DEST_ID_SHIFT: u32 = 12;
/// Destination bits that go in the high address word (KVM's x2APIC format).
const MSI_DEST_ID_HIGH_MASK: u32 = 0xffff_ff00;

/// Turns on 32-bit x2APIC IDs in MSIs and drops the 0xff broadcast quirk. Call once, after
/// the in-kernel irqchip exists and before any vCPU does.
pub fn enable_32bit_ids(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X2APIC_API,
        ..Default::default()
    };
    cap.args[0] = (KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK) as u64;
    vm.enable_cap(&cap)
}

/// A fixed, edge, physical-destination MSI for `vector` to APIC ID `dest` (in KVM's format
/// once [`enable_32bit_ids`] is on).
pub fn fixed_msi(dest: u32, vector: u8) -> kvm_msi {
    kvm_msi {
        address_lo: MSI_ADDRESS_BASE | ((dest & 0xff) << MSI_DEST_ID_SHIFT),
        address_hi: dest & MSI_DEST_ID_HIGH_MASK,
        data: vector as u32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_split_between_the_address_words() {
        let m = fixed_msi(5, 0xf2);
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_5000, 0, 0xf2));
        let m = fixed_msi(1023, 0x40);
        assert_eq!(
            (m.address_lo, m.address_hi),
            (0xfee0_0000 | 0xff << 12, 0x300)
        );
        let m = fixed_msi(255, 0x40);
        assert_eq!((m.address_lo, m.address_hi), (0xfee0_0000 | 0xff << 12, 0));
    }
}
