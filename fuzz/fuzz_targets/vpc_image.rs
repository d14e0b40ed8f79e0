//! A whole VHD (`vpc`) image opened and read from memory: the footer, the
//! dynamic header, the BAT, the sector bitmaps and the parent locators. Any
//! input gives data or an error, never a panic, a hang or an unbounded
//! allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::read_vpc(data, "/nonexistent/fuzz.vhd");
});
