//! The pvsync guest kernel's boot-time parsers, kept apart from the kernel so that they run
//! (and are tested, malformed input included) on the host:
//!
//! - [`cmdline`]: the guest command line (`test=... smp=N duration=MS ...`);
//! - [`acpi`]: RSDP -> XSDT/RSDT -> MADT, the enabled local APIC and x2APIC entries;
//! - [`pvh`]: the PVH `hvm_start_info`, its command line and memory map.
//!
//! Guest memory is reached only through [`PhysRead`], which copies bytes out: the parsers never
//! hold a pointer, never trust a length before bounding it, never loop longer than a bound
//! they set themselves, and report malformed input as an error value instead of panicking.
//!
//! ```
//! use pvsync_boot_parse::{PhysRead, SliceMem};
//! let mem = SliceMem::new(0x1000, &[1, 2, 3, 4]);
//! let mut b = [0u8; 2];
//! mem.read(0x1002, &mut b).unwrap();
//! assert_eq!(b, [3, 4]);
//! assert!(mem.read(0x1003, &mut b).is_err());
//! ```
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod acpi;
pub mod cmdline;
pub mod pvh;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod testmem;

use core::fmt;

/// A read that reaches outside the memory a [`PhysRead`] can see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub paddr: u64,
    pub len: usize,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes at {:#x} are outside readable memory",
            self.len, self.paddr
        )
    }
}

/// Physical memory, read by copying: the kernel's implementation reads through its identity
/// map (and refuses what that does not cover); the tests' read byte arrays.
pub trait PhysRead {
    /// Fills `buf` with the bytes at `[paddr, paddr + buf.len())`, or fails if any of them is
    /// not readable. Must not panic.
    fn read(&self, paddr: u64, buf: &mut [u8]) -> Result<(), OutOfRange>;
}

/// One contiguous byte slice placed at physical address `base`.
pub struct SliceMem<'a> {
    base: u64,
    bytes: &'a [u8],
}

impl<'a> SliceMem<'a> {
    pub const fn new(base: u64, bytes: &'a [u8]) -> Self {
        SliceMem { base, bytes }
    }
}

impl PhysRead for SliceMem<'_> {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            paddr,
            len: buf.len(),
        };
        let off = usize::try_from(paddr.checked_sub(self.base).ok_or(err)?).map_err(|_| err)?;
        let end = off.checked_add(buf.len()).ok_or(err)?;
        buf.copy_from_slice(self.bytes.get(off..end).ok_or(err)?);
        Ok(())
    }
}

/// `N` bytes at `paddr`.
pub(crate) fn read_array<const N: usize, R: PhysRead + ?Sized>(
    mem: &R,
    paddr: u64,
) -> Result<[u8; N], OutOfRange> {
    let mut b = [0u8; N];
    mem.read(paddr, &mut b)?;
    Ok(b)
}

pub(crate) fn read_u32<R: PhysRead + ?Sized>(mem: &R, paddr: u64) -> Result<u32, OutOfRange> {
    read_array(mem, paddr).map(u32::from_le_bytes)
}

pub(crate) fn read_u64<R: PhysRead + ?Sized>(mem: &R, paddr: u64) -> Result<u64, OutOfRange> {
    read_array(mem, paddr).map(u64::from_le_bytes)
}

/// Little-endian integers out of a byte slice the caller has already bounded.
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
