//! Serve traces: any bytes give a trace or an error, never a panic, and a
//! parsed trace gives back every write's data.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::trace_file(data, "fuzz.bvt");
});
