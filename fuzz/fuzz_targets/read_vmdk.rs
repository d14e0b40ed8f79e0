//! A whole VMDK disk opened from memory: a sparse extent (its header, footer,
//! grain directory, embedded descriptor), or a text descriptor; then map, read
//! and locate as read_image does. Any input gives data or an error, never a
//! panic, a hang or an unbounded allocation. Files a descriptor names resolve
//! under /nonexistent, so nothing outside is read.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkverify_rs::fuzzing::read_vmdk(data, "/nonexistent/fuzz.vmdk");
});
