//! The qcow2 write path on a hostile image in memory: open it writable, apply
//! a few writes, zero writes, discards and flushes the input chooses, close it,
//! and read it back. Any input gives data or an error, never a panic, a hang
//! or an unbounded allocation. The harness is blkverify_rs::fuzzing, shared
//! with the regression replay in tests/fuzz_regressions.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::write_image(data, "/nonexistent/fuzz.qcow2");
});
