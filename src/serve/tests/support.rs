//! What the server's tests share (`tests.rs` and `tests/hostile.rs`): the
//! images, made by QEMU's tools; a server on them with the options a test
//! names; its end; and a raw client's handshake in bytes.

use crate::driver::{self, OpenOptions};
use crate::nbd::wire::{OptionHeader, OptionReply, IHAVEOPT, NBDMAGIC, REP_INFO, REP_SERVER};
use crate::serve::{open_device, Finding, ServeOptions, Server, Summary};
use crate::verify::{self, VerifyOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The images' size, unless a test names another.
pub(super) const SIZE: u64 = 8 << 20;

/// Run `program`, which must succeed.
pub(super) fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(super) fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An empty qcow2 of `size` bytes at `path`, made by qemu-img.
pub(super) fn create_qcow2(path: &Path, size: u64) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(path),
            &size.to_string(),
        ],
    );
}

/// A zeroed raw reference and an empty qcow2, both `size` bytes.
pub(super) fn pair_of(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let raw = dir.join("raw.img");
    let test = dir.join("test.qcow2");
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    create_qcow2(&test, size);
    (raw, test)
}

/// A zeroed raw reference and an empty qcow2 of `SIZE` bytes.
pub(super) fn blank_pair(dir: &Path) -> (PathBuf, PathBuf) {
    pair_of(dir, SIZE)
}

/// A raw reference and a qcow2 with the same data, written by qemu-io.
pub(super) fn data_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (raw, test) = blank_pair(dir);
    for image in [&raw, &test] {
        let format = if image == &raw { "raw" } else { "qcow2" };
        run(
            "qemu-io",
            &[
                "-f",
                format,
                "-c",
                "write -P 0x5a 0 64k",
                "-c",
                "write -P 0xa5 1M 128k",
                "-c",
                "write -z 2M 64k",
                path_str(image),
            ],
        );
    }
    (raw, test)
}

/// A server with `options` on the pair.
pub(super) fn start(raw: &Path, test: &Path, options: ServeOptions) -> Server {
    let device = open_device(raw, test, &OpenOptions::default(), false).unwrap();
    Server::start(device, options).unwrap()
}

/// A server with `options` on a blank pair made in `dir`: the pair and the
/// server.
pub(super) fn serve_blank(dir: &Path, options: ServeOptions) -> (PathBuf, PathBuf, Server) {
    let (raw, test) = blank_pair(dir);
    let server = start(&raw, &test, options);
    (raw, test, server)
}

/// The options most tests serve with: persistent, four clients at once.
pub(super) fn persistent() -> ServeOptions {
    ServeOptions {
        persistent: true,
        shared: 4,
        ..ServeOptions::default()
    }
}

/// Stop the server: its summary and findings.
pub(super) fn finish(server: Server) -> (Summary, Vec<Finding>) {
    server.stop();
    let summary = server.take_outcome().unwrap().unwrap();
    (summary, server.findings(0))
}

/// Whether the two images hold the same guest data.
pub(super) fn identical(raw: &Path, test: &Path) -> bool {
    let open = |p: &Path| driver::open(p, &OpenOptions::default()).unwrap();
    let report = verify::verify(
        open(raw).as_ref(),
        open(test).as_ref(),
        &VerifyOptions::default(),
        &mut |_| true,
    )
    .unwrap();
    report.mismatches.is_empty()
}

/// A raw connection after the greeting and the client flags.
pub(super) fn greet(uri: &str) -> UnixStream {
    let socket = uri.split("socket=").nth(1).unwrap();
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Send an option; its replies (the last one final).
pub(super) fn option(s: &mut UnixStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    s.write_all(&OptionHeader::message(option, data)).unwrap();
    let mut replies = Vec::new();
    loop {
        let mut head = [0u8; OptionReply::SIZE];
        s.read_exact(&mut head).unwrap();
        let reply = OptionReply::decode(&head).unwrap();
        let mut data = vec![0u8; reply.length as usize];
        s.read_exact(&mut data).unwrap();
        let done = reply.reply != REP_INFO && reply.reply != REP_SERVER;
        replies.push((reply.reply, data));
        if done {
            return replies;
        }
    }
}

/// The data of an NBD_OPT_GO for the export `name`, asking for no
/// information.
pub(super) fn go_data(name: &str) -> Vec<u8> {
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(name.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    go
}
