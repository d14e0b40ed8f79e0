//! Our NBD client's reply parsing (simple replies, structured chunks, block
//! status chunks, error chunks) against a made-up server: the harness answers
//! the handshake well, as the input's first byte chooses, and the rest of the
//! input is the replies. The harness is blkverify_rs::fuzzing::nbd_replies,
//! shared with the regression replay in tests/fuzz_regressions.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::nbd_replies(data);
});
