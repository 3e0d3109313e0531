//! The pbzip2 worker: like pbzip2's compressor threads, each worker takes the next block of
//! the input, compresses it, and (our self-check) decompresses it again and compares, all in
//! user mode. The kernel plays pbzip2's reader and writer: every `SYS_PBZIP2_NEXT` reports
//! the previous block, has the kernel unmap that block's window (a TLB shootdown to every
//! other CPU running a worker) and map a fresh window for the next one.
//!
//! Compression is `lzss` (Okumura's LZSS, `no_std`, with its `safe` feature
//! `forbid(unsafe_code)`), chosen because it compresses without any allocation: its window
//! (`N2` = 8 KiB here) is a stack array. `lz4_flex` and `miniz_oxide` both box their
//! compressor tables (`alloc::vec!`/`Box`), i.e. call the global allocator, which is the
//! kernel's heap and cannot serve user mode (`#[global_allocator]` is one per image, and
//! neither crate takes an allocator argument). The brute-force match search of LZSS is slow
//! (a few MB/s), which suits the workload: like bzip2, the workers spend their time
//! computing in user mode while the shootdowns reach them there.
//!
//! User address layout of worker `w` (4 MiB each from [`REGION`]): a guard page, a 64 KiB
//! stack, a decompression buffer at +1 MiB, two block windows at +2 MiB and +3 MiB used in
//! turn (input pages, then output pages).

/// Where the workers' regions start (in the kernel's user half, above `user::USER_DATA_VA`).
pub const REGION: u64 = 0x0000_0080_4000_0000;
/// Virtual space of one worker.
pub const WORKER_STRIDE: u64 = 0x40_0000;
/// The stack, below a guard page.
pub const STACK_OFFSET: u64 = 0x1000;
pub const STACK_BYTES: u64 = 0x1_0000;
/// The decompression buffer.
pub const SCRATCH_OFFSET: u64 = 0x10_0000;
/// The two block windows, used in turn.
pub const WINDOW_OFFSETS: [u64; 2] = [0x20_0000, 0x30_0000];
/// Largest block (input and worst-case output fit a 1 MiB window).
pub const MAX_BLOCK_BYTES: usize = 256 * 1024;
pub const PAGE: u64 = 4096;

/// `SYS_PBZIP2_NEXT(w | status << 32, compressed_len)` returns the next block's index, or
/// [`DONE`] when there is none (values above `DONE` are errors).
pub const DONE: u64 = 1 << 63;
/// Status of the previous block: none yet, round trip matched, round trip failed.
pub const STATUS_NONE: u64 = 0;
pub const STATUS_OK: u64 = 1;
pub const STATUS_BAD: u64 = 2;

/// LZSS with a 4 KiB window and matches of 3..=18 bytes (Okumura's parameters), filled with
/// spaces.
pub type Codec = lzss::Lzss<12, 4, 0x20, { 1 << 12 }, { 2 << 12 }>;

/// Worst case of [`compress`]: every byte a 9-bit literal, plus the last partial byte.
pub const fn max_compressed(len: usize) -> usize {
    len + len / 8 + 8
}

// The layout holds together: a window fits the largest block's input and output, the
// decompression buffer the largest block, the stack below it; stacks are 16-byte aligned.
const _: () = {
    assert!(window_pages(MAX_BLOCK_BYTES) * PAGE <= WINDOW_OFFSETS[1] - WINDOW_OFFSETS[0]);
    assert!(WINDOW_OFFSETS[1] + window_pages(MAX_BLOCK_BYTES) * PAGE <= WORKER_STRIDE);
    assert!(MAX_BLOCK_BYTES as u64 <= WINDOW_OFFSETS[0] - SCRATCH_OFFSET);
    assert!(STACK_OFFSET + STACK_BYTES <= SCRATCH_OFFSET);
    assert!(stack_top(0) % 16 == 0 && WORKER_STRIDE % 16 == 0);
};

/// Start of worker `w`'s region.
pub const fn worker_base(w: u64) -> u64 {
    REGION + w * WORKER_STRIDE
}

/// Initial stack top of worker `w` (16-byte aligned).
pub const fn stack_top(w: u64) -> u64 {
    worker_base(w) + STACK_OFFSET + STACK_BYTES
}

/// Worker `w`'s decompression buffer.
pub const fn scratch_va(w: u64) -> u64 {
    worker_base(w) + SCRATCH_OFFSET
}

/// The window of the `seq`-th block worker `w` gets (0-based).
pub const fn window_va(w: u64, seq: u64) -> u64 {
    worker_base(w) + WINDOW_OFFSETS[(seq & 1) as usize]
}

/// Pages of a block's input.
pub const fn in_pages(block_bytes: usize) -> u64 {
    (block_bytes as u64).div_ceil(PAGE)
}

/// Pages of a window: input, then room for the worst-case output.
pub const fn window_pages(block_bytes: usize) -> u64 {
    in_pages(block_bytes) + (max_compressed(block_bytes) as u64).div_ceil(PAGE)
}

/// Text the blocks are made of: runs of 3 to 12 bytes from random places of it, so that
/// the data is compressible but not trivially so.
const TEXT: &[u8] = b"the quick brown fox jumps over the lazy dog; pbzip2 splits its input \
into blocks and compresses each on a thread of its own, so that every processor stays busy \
while the reader maps fresh buffers and the writer unmaps the old ones. 0123456789 ";

/// Fills `buf` with block `index` of the input that `seed` names (deterministic).
pub fn fill_block(seed: u64, index: u64, buf: &mut [u8]) {
    let mut x =
        (seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd) | 1;
    let mut i = 0;
    while i < buf.len() {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 3 + (x >> 60) as usize % 10;
        let start = (x % (TEXT.len() - 12) as u64) as usize;
        let n = len.min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&TEXT[start..start + n]);
        i += n;
    }
}

/// Compresses `input` into `out` (at least [`max_compressed`] bytes); the compressed length.
pub fn compress(input: &[u8], out: &mut [u8]) -> Option<usize> {
    Codec::compress_stack(lzss::SliceReader::new(input), lzss::SliceWriter::new(out)).ok()
}

/// Decompresses `input` into `out`; the decompressed length.
pub fn decompress(input: &[u8], out: &mut [u8]) -> Option<usize> {
    Codec::decompress_stack(lzss::SliceReader::new(input), lzss::SliceWriter::new(out)).ok()
}

/// Compresses `input` into `comp`, decompresses that into `dec` (at least as long as
/// `input`) and compares: the compressed length if the round trip gave `input` back.
pub fn round_trip(input: &[u8], comp: &mut [u8], dec: &mut [u8]) -> Option<usize> {
    let n = compress(input, comp)?;
    let m = decompress(&comp[..n], dec)?;
    (m == input.len() && dec[..m] == *input).then_some(n)
}

/// A worker's entry point at CPL 3: `worker(w | block_bytes << 32, seed)`, entered with the
/// stack pointer at [`stack_top`]`(w) - 8` (as after a call). Asks for blocks until there
/// are none, then exits with 0 (1: the kernel refused the call).
///
/// # Protocol (what makes the raw slices below sound)
/// The kernel maps, before `SYS_PBZIP2_NEXT` returns index `i` for the worker's `seq`-th
/// block, [`window_pages`] writable pages at [`window_va`]`(w, seq)` that nothing else
/// uses, and unmaps them only in the worker's next `SYS_PBZIP2_NEXT`; the decompression
/// buffer stays mapped for the worker's whole life. No slice outlives its loop iteration.
#[cfg(target_arch = "x86_64")]
pub extern "C" fn worker(arg0: u64, seed: u64) -> ! {
    use crate::sys;
    let w = arg0 & 0xffff;
    let block = (arg0 >> 32) as usize;
    if block == 0 || block > MAX_BLOCK_BYTES {
        sys::exit(3);
    }
    let mut status = STATUS_NONE;
    let mut out_len = 0;
    let mut seq = 0;
    loop {
        let index = sys::syscall2(sys::SYS_PBZIP2_NEXT, w | status << 32, out_len);
        if index == DONE {
            sys::exit(0);
        }
        if index > DONE {
            sys::exit(1);
        }
        let win = window_va(w, seq);
        seq += 1;
        // SAFETY: per the protocol above, these three ranges are mapped, writable, distinct
        // and used by this worker alone until its next system call.
        let (input, comp, dec) = unsafe {
            (
                core::slice::from_raw_parts_mut(win as *mut u8, block),
                core::slice::from_raw_parts_mut(
                    (win + in_pages(block) * PAGE) as *mut u8,
                    max_compressed(block),
                ),
                core::slice::from_raw_parts_mut(scratch_va(w) as *mut u8, block),
            )
        };
        fill_block(seed, index, input);
        (status, out_len) = match round_trip(input, comp, dec) {
            Some(n) => (STATUS_OK, n as u64),
            None => (STATUS_BAD, 0),
        };
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    #[test]
    fn blocks_round_trip_and_compress() {
        for (seed, index, len) in [
            (1, 0, 32 * 1024),
            (42, 7, 16 * 1024),
            (3, 9, 1000),
            (5, 1, 1),
        ] {
            let mut input = vec![0u8; len];
            fill_block(seed, index, &mut input);
            let mut comp = vec![0u8; max_compressed(len)];
            let mut dec = vec![0u8; len];
            let n = round_trip(&input, &mut comp, &mut dec).expect("round trip");
            if len >= 1000 {
                assert!(n < len * 3 / 4, "{len} bytes compressed to {n}");
            }
        }
    }

    #[test]
    fn blocks_differ_by_seed_and_index() {
        let mut a = [0u8; 256];
        let mut b = [0u8; 256];
        let mut c = [0u8; 256];
        fill_block(1, 0, &mut a);
        fill_block(1, 1, &mut b);
        fill_block(2, 0, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
        let mut again = [0u8; 256];
        fill_block(1, 0, &mut again);
        assert_eq!(a, again);
    }

    #[test]
    fn a_corrupted_stream_does_not_round_trip() {
        let mut input = vec![0u8; 4096];
        fill_block(9, 9, &mut input);
        let mut comp = vec![0u8; max_compressed(4096)];
        let n = compress(&input, &mut comp).unwrap();
        comp[n / 2] ^= 0x55;
        let mut dec = vec![0u8; 4096];
        let back = decompress(&comp[..n], &mut dec);
        assert!(back != Some(4096) || dec != input);
    }
}
