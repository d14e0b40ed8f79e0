//! The NBD server on a made-up client connection, as nbdkit's
//! `server/fuzzer.c` does: the input is every byte a client sends (the
//! handshake, options and requests), fed to `serve` over a socket pair in
//! front of a mirrored device in memory. Any input gives replies, errors or a
//! hang-up, never a panic, a hang or unbounded memory, and the two sides
//! stay alike (the harness checks). The harness is
//! blkverify_rs::fuzzing::serve_connection, shared with the regression
//! replay in tests/fuzz_regressions.rs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::serve_connection(data);
});
