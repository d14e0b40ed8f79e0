//! A whole-image open and read from memory: open, map and read the first
//! guest bytes and a few scattered ranges. Any input gives data or an error,
//! never a panic, a hang or an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::read_image(data, "/nonexistent/fuzz.qcow2");
});
