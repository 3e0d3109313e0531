//! Sparse fake physical memory for the tests: byte vectors at chosen addresses.

use std::vec::Vec;

use crate::{OutOfRange, PhysRead};

#[derive(Clone, Default)]
pub struct Mem {
    chunks: Vec<(u64, Vec<u8>)>,
}

impl Mem {
    /// Places `bytes` at `base`, replacing a chunk already there.
    pub fn put(&mut self, base: u64, bytes: Vec<u8>) {
        self.chunks.retain(|(b, _)| *b != base);
        self.chunks.push((base, bytes));
    }

    /// Overwrites one byte (which must be inside a chunk).
    pub fn poke(&mut self, paddr: u64, v: u8) {
        let (base, bytes) = self
            .chunks
            .iter_mut()
            .find(|(b, c)| paddr >= *b && paddr - *b < c.len() as u64)
            .expect("poke inside a chunk");
        bytes[(paddr - *base) as usize] = v;
    }

    pub fn chunks_mut(&mut self) -> &mut Vec<(u64, Vec<u8>)> {
        &mut self.chunks
    }
}

impl PhysRead for Mem {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            paddr,
            len: buf.len(),
        };
        let end = paddr.checked_add(buf.len() as u64).ok_or(err)?;
        let (base, bytes) = self
            .chunks
            .iter()
            .find(|(b, c)| paddr >= *b && end <= *b + c.len() as u64)
            .ok_or(err)?;
        let off = (paddr - base) as usize;
        buf.copy_from_slice(&bytes[off..off + buf.len()]);
        Ok(())
    }
}
