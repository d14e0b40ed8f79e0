//! A batch that runs out of descriptors it was told it had (the process
//! opened files of its own after the batch started) fails no pair for it: a
//! pair that cannot open waits for another to close, and the batch runs
//! fewer pairs at once from then on, and says so. One test in its own
//! binary: it lowers the process's open-file limit.

use blkverify_rs::batch::descriptors::{open_now, RESERVE};
use blkverify_rs::batch::{BatchStream, ReferenceKind, StreamOptions, VerifyJob};
use blkverify_rs::driver::OpenOptions;
use blkverify_rs::VerifyOptions;
use std::fs::File;

#[test]
fn pairs_that_run_out_of_descriptors_wait_for_others_to_close() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 64 << 10]).unwrap();

    // Room for four pairs of two raw files (four descriptors a pair).
    let limit = open_now() + RESERVE + 16;
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one `rlimit` of ours.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit), 0);
        rlimit.rlim_cur = limit as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit), 0);
    }
    let pairs = 40;
    let mut stream = BatchStream::new(StreamOptions {
        threads: 4,
        pairs_total: Some(pairs),
        total: None,
    });
    assert_eq!(stream.slots(), 4);
    assert_eq!(stream.take_notice(), None, "four pairs fit");

    // Someone else takes all but six descriptors: one pair fits at a time.
    let mut others = Vec::new();
    while let Ok(file) = File::open("/dev/null") {
        others.push(file);
    }
    others.truncate(others.len() - 6);

    let job = VerifyJob {
        raw: image.clone(),
        reference: ReferenceKind::Image,
        test: image.clone(),
        raw_options: OpenOptions::default(),
        test_options: OpenOptions::default(),
        options: VerifyOptions::default(),
    };
    let mut fed = 0;
    let mut verified = 0;
    loop {
        while stream.room() > 0 && fed < pairs {
            stream.feed(job.clone());
            fed += 1;
        }
        match stream.next_result(&mut |_| true).unwrap() {
            Some((_, result)) => {
                let checked = result.unwrap_or_else(|e| panic!("pair {verified}: {e}"));
                assert!(checked.report.identical);
                verified += 1;
            }
            None => break,
        }
    }
    assert_eq!(verified, pairs);
    let notice = stream
        .take_notice()
        .expect("the batch says it ran fewer pairs");
    assert!(notice.contains(&format!("ulimit -n: {limit}")), "{notice}");
    drop(others);
}
