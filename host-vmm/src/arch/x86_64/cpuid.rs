//! Per-vCPU CPUID: KVM's supported list with x2APIC exposed and the APIC ID filled in
//! (KVM does not fill APIC IDs in).

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EBX_APIC_ID_SHIFT: u32 = 24;

/// Patches `cpuid` (a copy of KVM's supported list) for the vCPU with `apic_id`.
pub fn patch_for_vcpu(cpuid: &mut CpuId, apic_id: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // Only 8 bits here; leaves 0xb/0x1f carry the whole x2APIC ID.
                e.ebx = (e.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << EBX_APIC_ID_SHIFT);
                e.ecx |= ECX_X2APIC | ECX_HYPERVISOR;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => e.edx = apic_id,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_x2apic_are_set() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff12_3456,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 42,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        patch_for_vcpu(&mut cpuid, 5);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx, 0x0512_3456);
        assert_ne!(s[0].ecx & ECX_X2APIC, 0);
        assert_eq!(s[1].edx, 5);
        assert_eq!(s[2].ebx, 42, "unrelated leaves untouched");
        patch_for_vcpu(&mut cpuid, 1000);
        let s = cpuid.as_slice();
        assert_eq!(
            s[0].ebx,
            (1000 & 0xff) << 24 | 0x12_3456,
            "8 bits in leaf 1"
        );
        assert_eq!(s[1].edx, 1000, "the whole ID in leaf 0xb");
    }
}
