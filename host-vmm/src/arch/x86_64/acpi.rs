//! ACPI tables the guest reads to count CPUs: RSDP -> XSDT -> MADT (one local APIC per vCPU,
//! APIC ID = vCPU index; a Processor Local x2APIC entry for IDs from 255 on, which an 8-bit
//! entry cannot name).

use acpi_tables::madt::{EnabledStatus, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use super::layout::{ACPI_END, ACPI_START, APIC_DEFAULT_PHYS_BASE};

const OEM_ID: [u8; 6] = *b"PVSYNC";
const OEM_TABLE_ID: [u8; 8] = *b"PVSYNCVM";

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit between {ACPI_START:#x} and {ACPI_END:#x}")]
    TooLarge(usize),
    #[error("writing ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align16(x: u64) -> u64 {
    x.div_ceil(16) * 16
}

/// MADT structure type 9, Processor Local x2APIC (ACPI 6.5, 5.2.12.12): 16 bytes.
const MADT_LOCAL_X2APIC: u8 = 9;
/// First APIC ID that needs an x2APIC entry: 0xff is the xAPIC broadcast ID.
const FIRST_X2APIC_ONLY_ID: u32 = 0xff;

/// Processor Local x2APIC structure (acpi_tables 0.2 has only the 8-bit local APIC one).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct ProcessorLocalX2Apic {
    r#type: u8,
    length: u8,
    reserved: u16,
    x2apic_id: u32,
    flags: u32,
    processor_uid: u32,
}

impl ProcessorLocalX2Apic {
    fn new(id: u32) -> Self {
        ProcessorLocalX2Apic {
            r#type: MADT_LOCAL_X2APIC,
            length: 16,
            reserved: 0,
            x2apic_id: id.to_le(),
            flags: (EnabledStatus::Enabled as u32).to_le(),
            processor_uid: id.to_le(),
        }
    }
}

impl Aml for ProcessorLocalX2Apic {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Writes the tables for `nr_vcpus` vCPUs; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, nr_vcpus: u32) -> Result<GuestAddress, AcpiError> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(APIC_DEFAULT_PHYS_BASE),
    );
    for id in 0..nr_vcpus {
        match u8::try_from(id) {
            Ok(id8) if id < FIRST_X2APIC_ONLY_ID => {
                madt.add_structure(ProcessorLocalApic::new(id8, id8, EnabledStatus::Enabled))
            }
            _ => madt.add_structure(ProcessorLocalX2Apic::new(id)),
        }
    }
    let madt = bytes_of(&madt);

    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    // XSDT with one entry: header + 8 bytes.
    let madt_addr = align16(xsdt_addr + 36 + 8);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END || xsdt_addr + xsdt.len() as u64 > madt_addr {
        return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
    }
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))?;
    mem.write_slice(&xsdt, GuestAddress(xsdt_addr))?;
    mem.write_slice(&madt, GuestAddress(madt_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn tables_chain_and_checksum() {
        let (m, madt_len) = madt(64);
        assert_eq!(
            madt_len,
            44 + 64 * 8,
            "header + one 8-byte local APIC entry per vCPU"
        );
        assert_eq!(m[44 + 63 * 8 + 3], 63, "last entry's APIC ID");
    }

    /// From APIC ID 255 on, 16-byte x2APIC entries (type 9) name the vCPUs.
    #[test]
    fn large_vms_get_x2apic_entries() {
        let (m, len) = madt(1024);
        assert_eq!(len, 44 + 255 * 8 + 769 * 16);
        let x = 44 + 255 * 8;
        assert_eq!(m[x - 8 + 3], 254, "last 8-byte entry");
        for (i, id) in [(0usize, 255u32), (768, 1023)] {
            let e = &m[x + 16 * i..x + 16 * (i + 1)];
            assert_eq!((e[0], e[1]), (MADT_LOCAL_X2APIC, 16));
            assert_eq!(u32::from_le_bytes(e[4..8].try_into().unwrap()), id);
            assert_eq!(
                u32::from_le_bytes(e[8..12].try_into().unwrap()),
                1,
                "enabled"
            );
            assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), id, "UID");
        }
    }

    /// The MADT for `n` vCPUs (checksums checked on the way) and its length.
    fn madt(n: u32) -> (Vec<u8>, usize) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_tables(&mem, n).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(checksum(&r[..20]), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut x = [0u8; 44];
        mem.read_slice(&mut x, GuestAddress(xsdt_addr)).unwrap();
        assert_eq!(&x[..4], b"XSDT");
        assert_eq!(checksum(&x), 0);
        let madt_addr = u64::from_le_bytes(x[36..44].try_into().unwrap());
        let mut h = [0u8; 8];
        mem.read_slice(&mut h, GuestAddress(madt_addr)).unwrap();
        assert_eq!(&h[..4], b"APIC");
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut m = vec![0u8; len];
        mem.read_slice(&mut m, GuestAddress(madt_addr)).unwrap();
        assert_eq!(checksum(&m), 0);
        (m, len)
    }
}
