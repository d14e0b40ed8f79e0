//! A whole VHDX image opened and read from memory: headers, region table,
//! metadata, BAT, a dirty log replayed in memory. Any input gives data or an
//! error, never a panic, a hang or an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::read_vhdx(data, "/nonexistent/fuzz.vhdx");
});
