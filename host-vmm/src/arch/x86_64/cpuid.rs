//! Per-vCPU CPUID: KVM's supported list with x2APIC exposed and the APIC ID filled in
//! (KVM does not fill APIC IDs in).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EBX_APIC_ID_SHIFT: u32 = 24;

/// CPUID.0xB level types (ECX[15:8]).
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Patches `cpuid` (a copy of KVM's supported list) for the vCPU with `apic_id` of a VM
/// with `nr_vcpus`: x2APIC on, the APIC ID in leaf 1 (8 bits) and in the extended
/// topology leaf 0xB (all 32 bits), which it rewrites as one package of `nr_vcpus` cores
/// of one thread each. KVM's supported list may carry leaf 0xB empty (an AMD host does):
/// a guest then finds no valid level and, past APIC ID 255, no way to learn its own ID.
pub fn patch_for_vcpu(
    cpuid: &mut CpuId,
    apic_id: u32,
    nr_vcpus: u32,
) -> Result<(), vmm_sys_util::fam::Error> {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            // Only 8 bits here; leaf 0xB carries the whole x2APIC ID.
            e.ebx = (e.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << EBX_APIC_ID_SHIFT);
            e.ecx |= ECX_X2APIC | ECX_HYPERVISOR;
        }
    }
    // Leaf 0x1F, which software prefers where it exists, says the same as 0xB.
    let leaves: &[u32] = if cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_V2_EXT_TOPOLOGY)
    {
        &[LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY]
    } else {
        &[LEAF_EXT_TOPOLOGY]
    };
    cpuid.retain(|e| !leaves.contains(&e.function));
    // Bits of the APIC ID that number cores: enough for the highest ID.
    let core_bits = u32::BITS - nr_vcpus.saturating_sub(1).leading_zeros();
    let levels = [
        (0, 1, LEVEL_TYPE_SMT),
        (core_bits, nr_vcpus, LEVEL_TYPE_CORE),
        (0, 0, LEVEL_TYPE_INVALID),
    ];
    for (&function, (index, (shift, count, kind))) in leaves
        .iter()
        .flat_map(|f| levels.into_iter().enumerate().map(move |l| (f, l)))
    {
        cpuid.push(kvm_cpuid_entry2 {
            function,
            index: index as u32,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: kind << 8 | index as u32,
            edx: apic_id,
            ..Default::default()
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 42,
                ..Default::default()
            },
        ];
        let leaf = |c: &CpuId, f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        patch_for_vcpu(&mut cpuid, 5, 8).unwrap();
        assert_eq!(leaf(&cpuid, 1, 0).ebx, 0x0512_3456);
        assert_ne!(leaf(&cpuid, 1, 0).ecx & ECX_X2APIC, 0);
        assert_eq!(leaf(&cpuid, 7, 0).ebx, 42, "unrelated leaves untouched");
        // Leaf 0xB: SMT level of one thread, core level of 8 cores in 3 ID bits, then an
        // invalid level; each names the whole ID.
        let smt = leaf(&cpuid, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8 & 0xff, smt.edx),
            (0, 1, 1, 5)
        );
        let core = leaf(&cpuid, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx, core.edx),
            (3, 8, 2 << 8 | 1, 5)
        );
        assert_eq!(leaf(&cpuid, 0xb, 2).ecx, 2, "level 2 is invalid (type 0)");
        assert_eq!(
            cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == 0xb)
                .count(),
            3,
            "KVM's empty leaf 0xB replaced"
        );

        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        patch_for_vcpu(&mut cpuid, 1000, 1024).unwrap();
        assert_eq!(
            leaf(&cpuid, 1, 0).ebx,
            (1000 & 0xff) << 24 | 0x12_3456,
            "8 bits in leaf 1"
        );
        assert_eq!(leaf(&cpuid, 0xb, 0).edx, 1000, "the whole ID in leaf 0xb");
        assert_eq!(leaf(&cpuid, 0xb, 1).eax, 10, "1024 IDs need 10 bits");
        assert!(
            !cpuid.as_slice().iter().any(|e| e.function == 0x1f),
            "no leaf 0x1F where KVM lists none"
        );

        // Where KVM lists leaf 0x1F, it mirrors 0xB.
        let mut with_1f = entries.to_vec();
        with_1f.push(kvm_cpuid_entry2 {
            function: 0x1f,
            ..Default::default()
        });
        let mut cpuid = CpuId::from_entries(&with_1f).unwrap();
        patch_for_vcpu(&mut cpuid, 300, 512).unwrap();
        for i in 0..3 {
            let (a, b) = (leaf(&cpuid, 0x1f, i), leaf(&cpuid, 0xb, i));
            assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (b.eax, b.ebx, b.ecx, b.edx));
        }
    }
}
