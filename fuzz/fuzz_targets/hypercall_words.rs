//! Hypercall words: any port and any 32-bit argument decode or are refused, and what
//! decodes encodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_abi::{Hypercall, IpiRequest};

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let port = u16::from_le_bytes([data[0], data[1]]);
    let word = u32::from_le_bytes([data[2], data[3], data[4], data[5]]);
    if let Some(h) = Hypercall::from_port(port) {
        assert_eq!(h.port(), port);
    }
    if let Some(r) = IpiRequest::decode(word) {
        assert_eq!(IpiRequest::decode(r.encode()), Some(r));
    }
});
