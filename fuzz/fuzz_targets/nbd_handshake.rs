//! Our NBD client against a made-up server: the input is every byte the
//! server sends, from the greeting on (options replies, then replies to the
//! client's reads, writes, block status, zeroing, trims and flush). Any input
//! gives data or an error naming the export and the fact, never a panic, a
//! hang or unbounded memory. The harness is blkverify_rs::fuzzing::nbd_client,
//! shared with the regression replay in tests/fuzz_regressions.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::nbd_client(data);
});
