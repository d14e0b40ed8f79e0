//! L1/L2 entry decoding for every cluster size, with and without subclusters.
//! The input layout is `blkverify_rs::fuzzing::L2_ENTRY_INPUT_BYTES`'s.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::l2_entry(data);
});
