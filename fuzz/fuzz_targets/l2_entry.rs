//! L1/L2 entry decoding for every cluster size, with and without subclusters.
#![no_main]
use blkverify_rs::driver::qcow2::l2;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, u64, u8, u8, bool)| {
    let (entry, bitmap, bits, sub, data_file) = input;
    let cluster_bits = 9 + u32::from(bits) % 13;
    let _ = l2::l1_offset(entry);
    let _ = l2::decode(entry, cluster_bits, data_file);
    if cluster_bits >= 14 {
        let _ = l2::decode_subcluster(entry, bitmap, u32::from(sub) % 32, cluster_bits, data_file);
    }
});
