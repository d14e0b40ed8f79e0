//! A whole VDI image opened and read from memory: the header and the block
//! map. Any input gives data or an error, never a panic, a hang or an
//! unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::read_vdi(data, "/nonexistent/fuzz.vdi");
});
