//! Block digests files: any bytes give a file or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::digests_file(data, "fuzz.digests");
});
