//! Replays every input in fuzz/regressions/: inputs that once crashed, hung or
//! over-allocated in a fuzz target. Each must now give data or an error that
//! names the image, never a panic.

use blkverify_rs::fuzzing::{self, Outcome};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every input of `target`, sorted. A missing or empty directory fails: a
/// replay that reads nothing would pass having checked nothing.
fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz/regressions/{target} cannot be read: {e}"));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    assert!(!files.is_empty(), "fuzz/regressions/{target} has no inputs");
    files.sort();
    files
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Header inputs named `valid-*` (qemu-img's images) must parse; `bad-*`
/// (one area damaged) must be refused naming the image; any other input (a
/// fuzzer's find) may do either, but never panic.
#[test]
fn header_regressions_give_errors_not_panics() {
    let (mut valid, mut bad) = (0, 0);
    for path in inputs("header") {
        let data = std::fs::read(&path).unwrap();
        let name = file_name(&path);
        let outcome = fuzzing::header(&data, "regression.qcow2");
        match outcome.open_error {
            Some(e) => {
                assert!(
                    !name.starts_with("valid-"),
                    "{}: a valid header is refused: {e}",
                    path.display()
                );
                assert!(
                    e.to_string().contains("regression.qcow2"),
                    "{}: {e}",
                    path.display()
                );
                bad += 1;
            }
            None => {
                assert!(
                    !name.starts_with("bad-"),
                    "{}: a damaged header is accepted",
                    path.display()
                );
                valid += 1;
            }
        }
    }
    assert!(
        valid > 0 && bad > 0,
        "{valid} headers parsed, {bad} refused"
    );
}

/// Block digests files named `valid-*` (written by `blkverify digest`) must
/// parse; `bad-*` (one field damaged, most with the checksum redone so the
/// damage is what is found) must be refused naming the file.
#[test]
fn digests_file_regressions_give_errors_not_panics() {
    let (mut valid, mut bad) = (0, 0);
    for path in inputs("digests_file") {
        let data = std::fs::read(&path).unwrap();
        let name = file_name(&path);
        match fuzzing::digests_file(&data, "regression.digests").open_error {
            Some(e) => {
                assert!(
                    !name.starts_with("valid-"),
                    "{}: a valid file is refused: {e}",
                    path.display()
                );
                assert!(
                    e.to_string().contains("regression.digests"),
                    "{}: {e}",
                    path.display()
                );
                bad += 1;
            }
            None => {
                assert!(
                    !name.starts_with("bad-"),
                    "{}: a damaged file is accepted",
                    path.display()
                );
                valid += 1;
            }
        }
    }
    assert!(valid > 0 && bad > 0, "{valid} files parsed, {bad} refused");
}

/// Every entry decodes or is refused with a message that shows the entry (or
/// its bitmap) it refuses.
#[test]
fn l2_entry_regressions_give_errors_not_panics() {
    let mut refused = 0;
    for path in inputs("l2_entry") {
        let data = std::fs::read(&path).unwrap();
        let mut input = [0u8; fuzzing::L2_ENTRY_INPUT_BYTES];
        for (dst, src) in input.iter_mut().zip(&data) {
            *dst = *src;
        }
        let entry = format!(
            "{:#018x}",
            u64::from_be_bytes(input[..8].try_into().unwrap())
        );
        let bitmap = format!(
            "{:#018x}",
            u64::from_be_bytes(input[8..16].try_into().unwrap())
        );
        for e in fuzzing::l2_entry(&data) {
            assert!(
                e.contains(&entry) || e.contains(&bitmap),
                "{}: the message does not show the entry {entry}: {e}",
                path.display()
            );
            refused += 1;
        }
    }
    assert!(refused > 0, "no l2_entry input was refused");
}

/// Run a harness on every input of `target` and check what it produced: an
/// open error names the image (`name`, or for a vmdk descriptor a file it
/// names beside it), every other error says something, and no input takes long.
fn replay(target: &str, harness: fn(&[u8], &str) -> Outcome, name: &str) {
    for path in inputs(target) {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = harness(&data, &format!("/nonexistent/{name}"));
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(10),
            "{}: took {elapsed:?}",
            path.display()
        );
        if let Some(e) = outcome.open_error {
            assert!(
                e.to_string().contains(if name.ends_with(".vmdk") {
                    "/nonexistent/"
                } else {
                    name
                }),
                "{}: {e}",
                path.display()
            );
        }
        for e in outcome.op_errors {
            assert!(!e.to_string().is_empty(), "{}", path.display());
        }
    }
}

#[test]
fn read_image_regressions_give_errors_not_panics() {
    replay("read_image", fuzzing::read_image, "regression.qcow2");
}

/// The write_image target's input: a count byte, that many 8-byte operations,
/// then the image (see blkverify_rs::fuzzing::write_image).
#[test]
fn write_image_regressions_give_errors_not_panics() {
    replay("write_image", fuzzing::write_image, "regression.qcow2");
}

#[test]
fn read_vmdk_regressions_give_errors_not_panics() {
    replay("read_vmdk", fuzzing::read_vmdk, "regression.vmdk");
}

#[test]
fn vpc_image_regressions_give_errors_not_panics() {
    replay("vpc_image", fuzzing::read_vpc, "regression.vhd");
}

#[test]
fn vdi_image_regressions_give_errors_not_panics() {
    replay("vdi_image", fuzzing::read_vdi, "regression.vdi");
}

#[test]
fn read_vhdx_regressions_give_errors_not_panics() {
    replay("read_vhdx", fuzzing::read_vhdx, "regression.vhdx");
}

/// Every error of an NBD client harness run names the export, and says
/// something after it.
fn nbd_errors_name_the_export(path: &Path, outcome: &Outcome) {
    for e in outcome.open_error.iter().chain(&outcome.op_errors) {
        let text = e.to_string();
        assert!(
            text.contains(fuzzing::NBD_FUZZ_NAME) && text.contains("nbd: "),
            "{}: {text}",
            path.display()
        );
    }
}

/// The server's whole connections: the `seed-*` inputs are what real
/// clients (qemu-io, qemu-img, nbdinfo, nbdcopy) sent to serve, recorded by
/// `record_nbd_seeds` below; they must be served without a refusal. Every
/// input ends in time, without a server error, with the two sides alike
/// (the harness checks that).
#[test]
fn serve_connection_regressions_are_served_or_refused_never_a_panic() {
    let mut seeds = 0;
    for path in inputs("serve_connection") {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = fuzzing::serve_connection(&data);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}: took {:?}",
            path.display(),
            started.elapsed()
        );
        assert!(
            outcome.error.is_none(),
            "{}: {:?}",
            path.display(),
            outcome.error
        );
        let summary = outcome.summary.expect("a summary");
        if file_name(&path).starts_with("seed-") {
            assert!(summary.requests > 0, "{}: {summary:?}", path.display());
            assert_eq!(summary.refused, 0, "{}: {summary:?}", path.display());
            assert!(outcome.replied > 0);
            seeds += 1;
        }
    }
    assert!(seeds >= 3, "{seeds} recorded client sessions");
}

/// Our NBD client against whole server transcripts: the `seed-*` inputs are
/// what real servers (qemu-nbd, nbdkit, serve) answered to this very
/// session, recorded by `record_nbd_seeds`; replayed, every request of the
/// session succeeds. Any other input gives errors that name the export.
#[test]
fn nbd_handshake_regressions_give_errors_not_panics() {
    let mut seeds = 0;
    for path in inputs("nbd_handshake") {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = fuzzing::nbd_client(&data);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            path.display()
        );
        nbd_errors_name_the_export(&path, &outcome);
        if file_name(&path).starts_with("seed-") {
            assert!(
                outcome.open_error.is_none(),
                "{}: {:?}",
                path.display(),
                outcome.open_error
            );
            assert!(
                outcome.op_errors.is_empty(),
                "{}: {:?}",
                path.display(),
                outcome.op_errors
            );
            seeds += 1;
        }
    }
    assert!(seeds >= 2, "{seeds} recorded server sessions");
}

/// The reply stream alone, after a handshake the harness makes: the
/// `seed-*` inputs are real servers' replies to the session (the handshake
/// cut off, its terms in the prefix), and succeed; the `bad-*` ones (a read
/// answered without all its data, chunks that overlap or lie outside the
/// request, a reply to a cookie never sent, a status chunk for a read) fail
/// the first request; any other gives errors that name the export.
#[test]
fn nbd_replies_regressions_give_errors_not_panics() {
    let mut seeds = 0;
    let mut bad = 0;
    for path in inputs("nbd_replies") {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = fuzzing::nbd_replies(&data);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            path.display()
        );
        nbd_errors_name_the_export(&path, &outcome);
        if file_name(&path).starts_with("seed-") {
            assert!(
                outcome.open_error.is_none(),
                "{}: {:?}",
                path.display(),
                outcome.open_error
            );
            assert!(
                outcome.op_errors.is_empty(),
                "{}: {:?}",
                path.display(),
                outcome.op_errors
            );
            seeds += 1;
        }
        if file_name(&path).starts_with("bad-") {
            // The first request (a 4 KiB read at 0) is the one refused.
            let first = outcome.op_errors.first().map(ToString::to_string);
            assert!(
                first
                    .as_deref()
                    .is_some_and(|e| e.contains("read at offset 0x0")),
                "{}: {first:?}",
                path.display()
            );
            bad += 1;
        }
    }
    assert!(
        seeds >= 1 && bad >= 6,
        "{seeds} recorded reply streams, {bad} bad ones"
    );
}

/// Record the NBD seeds (run by hand, then commit the files):
/// `cargo test --release --test fuzz_regressions -- --ignored record_nbd_seeds`.
/// Real clients talk to serve through a recording proxy (what they send is
/// a `serve_connection` seed), and our client's fuzz session talks to real
/// servers (what they answer is an `nbd_handshake` seed, and its replies
/// after the handshake an `nbd_replies` seed).
#[test]
#[ignore = "writes the seeds into fuzz/regressions; run by hand"]
fn record_nbd_seeds() {
    record::all();
}

mod record {
    use super::*;
    use blkverify_rs::nbd::wire::{OptionReply, OPT_GO, REP_ACK};
    use blkverify_rs::nbd::Stream;
    use blkverify_rs::serve::{open_device, ServeOptions, Server};
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::process::{Child, Command};
    use std::thread::JoinHandle;

    fn regressions(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(target)
    }

    fn run(argv: &[&str]) {
        let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Copy `from` to `to` until EOF, keeping every byte.
    fn pump(mut from: UnixStream, mut to: UnixStream) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 1 << 16];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
            }
            let _ = to.shutdown(Shutdown::Write);
            kept
        })
    }

    /// One connection through a proxy at `listen` to the server at
    /// `upstream`, with `client` connecting to the proxy: what the client
    /// sent, and what the server answered.
    fn proxied(listen: &Path, upstream: &Path, client: impl FnOnce(&Path)) -> (Vec<u8>, Vec<u8>) {
        let _ = std::fs::remove_file(listen);
        let listener = UnixListener::bind(listen).unwrap();
        let upstream = upstream.to_path_buf();
        let proxy = std::thread::spawn(move || {
            let (down, _) = listener.accept().unwrap();
            let up = UnixStream::connect(&upstream).unwrap();
            let sent = pump(down.try_clone().unwrap(), up.try_clone().unwrap());
            let answered = pump(up, down);
            (sent.join().unwrap(), answered.join().unwrap())
        });
        client(listen);
        proxy.join().unwrap()
    }

    fn uri(socket: &Path) -> String {
        format!("nbd+unix:///fuzz?socket={}", socket.display())
    }

    /// The length of the handshake at the start of a server's transcript:
    /// the greeting, then option replies up to `NBD_OPT_GO`'s ACK.
    fn handshake_len(answered: &[u8]) -> usize {
        let mut at = 18;
        loop {
            let head: [u8; OptionReply::SIZE] =
                answered[at..at + OptionReply::SIZE].try_into().unwrap();
            let reply = OptionReply::decode(&head).unwrap();
            at += OptionReply::SIZE + reply.length as usize;
            if reply.option == OPT_GO && reply.reply == REP_ACK {
                return at;
            }
        }
    }

    fn wait_for(socket: &Path, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(socket).is_err() {
            assert!(child.try_wait().unwrap().is_none() && Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let s = |p: &Path| p.to_str().unwrap().to_string();
        // serve_connection: real clients to serve of a 1 MiB pair, as the
        // harness's device.
        let (raw, test) = (d.join("raw.img"), d.join("test.qcow2"));
        let size = fuzzing::SERVE_EXPORT_SIZE.to_string();
        run(&["qemu-img", "create", "-q", "-f", "raw", &s(&raw), &size]);
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &s(&test),
            &size,
        ]);
        let source = d.join("source.raw");
        run(&["qemu-img", "create", "-q", "-f", "raw", &s(&source), &size]);
        run(&[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 64k",
            "-c",
            "write -P 0x62 300k 8k",
            &s(&source),
        ]);
        let clients: Vec<(&str, Vec<String>)> = vec![
            (
                "qemu-io",
                vec![
                    "qemu-io".into(),
                    "-f".into(),
                    "raw".into(),
                    "-c".into(),
                    "write -P 0x11 0 64k".into(),
                    "-c".into(),
                    "read -P 0x11 0 64k".into(),
                    "-c".into(),
                    "write -z 128k 64k".into(),
                    "-c".into(),
                    "discard 256k 64k".into(),
                    "-c".into(),
                    "aio_write -P 0x22 4k 4k".into(),
                    "-c".into(),
                    "aio_flush".into(),
                    "-c".into(),
                    "read 900k 8k".into(),
                    "-c".into(),
                    "flush".into(),
                    "URI".into(),
                ],
            ),
            (
                "qemu-img-convert",
                vec![
                    "qemu-img".into(),
                    "convert".into(),
                    "-n".into(),
                    "-f".into(),
                    "raw".into(),
                    "-O".into(),
                    "raw".into(),
                    s(&source),
                    "URI".into(),
                ],
            ),
            (
                "qemu-img-map",
                vec![
                    "qemu-img".into(),
                    "map".into(),
                    "--output=json".into(),
                    "-f".into(),
                    "raw".into(),
                    "URI".into(),
                ],
            ),
            (
                "nbdinfo-map",
                vec!["nbdinfo".into(), "--map".into(), "URI".into()],
            ),
            (
                "nbdcopy",
                vec!["nbdcopy".into(), "URI".into(), "null:".into()],
            ),
        ];
        for (name, argv) in clients {
            let device =
                open_device(&raw, &test, &blkverify_rs::OpenOptions::default(), false).unwrap();
            let server = Server::start(
                device,
                ServeOptions {
                    listen: blkverify_rs::serve::Listen::Socket(d.join("serve.sock")),
                    export_name: "fuzz".into(),
                    persistent: true,
                    ..ServeOptions::default()
                },
            )
            .unwrap();
            let (sent, _) = proxied(&d.join("proxy.sock"), &d.join("serve.sock"), |proxy| {
                let argv: Vec<String> = argv
                    .iter()
                    .map(|a| if a == "URI" { uri(proxy) } else { a.clone() })
                    .collect();
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                run(&argv);
            });
            server.stop();
            server.take_outcome().unwrap().unwrap();
            // An odd length keeps the raw test side; make it even (a qcow2
            // test side, as recorded) by ending with a disconnect's padding.
            let mut sent = sent;
            if sent.len() % 2 == 1 {
                sent.push(0);
            }
            std::fs::write(
                regressions("serve_connection").join(format!("seed-{name}")),
                &sent,
            )
            .unwrap();
        }
        // nbd_handshake and nbd_replies: our client's session against real
        // servers of a 64 KiB image.
        let image = d.join("small.raw");
        run(&["qemu-img", "create", "-q", "-f", "raw", &s(&image), "64k"]);
        run(&[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 16k",
            &s(&image),
        ]);
        let upstream = d.join("up.sock");
        let servers: Vec<(&str, Vec<String>)> = vec![
            (
                "qemu-nbd",
                vec![
                    "qemu-nbd".into(),
                    "-f".into(),
                    "raw".into(),
                    "-x".into(),
                    "fuzz".into(),
                    "--persistent".into(),
                    "-k".into(),
                    s(&upstream),
                    s(&image),
                ],
            ),
            (
                "nbdkit",
                vec![
                    "nbdkit".into(),
                    "-f".into(),
                    "-U".into(),
                    s(&upstream),
                    "-e".into(),
                    "fuzz".into(),
                    "memory".into(),
                    "64K".into(),
                ],
            ),
        ];
        for (name, argv) in servers {
            let _ = std::fs::remove_file(&upstream);
            let mut child = Command::new(&argv[0]).args(&argv[1..]).spawn().unwrap();
            wait_for(&upstream, &mut child);
            let (_, answered) = proxied(&d.join("proxy.sock"), &upstream, |proxy| {
                let stream = UnixStream::connect(proxy).unwrap();
                let outcome = fuzzing::nbd_client_session(Stream::Unix(stream));
                assert!(
                    outcome.open_error.is_none(),
                    "{name}: {:?}",
                    outcome.open_error
                );
                assert!(
                    outcome.op_errors.is_empty(),
                    "{name}: {:?}",
                    outcome.op_errors
                );
            });
            child.kill().unwrap();
            child.wait().unwrap();
            std::fs::write(
                regressions("nbd_handshake").join(format!("seed-{name}")),
                &answered,
            )
            .unwrap();
            // The replies after the handshake, behind the prefix naming the
            // terms these servers give: structured replies, base:allocation
            // (its id as the server gave it), 1-byte blocks, writable.
            let cut = handshake_len(&answered);
            let id = context_id(&answered[..cut]);
            let mut replies = vec![0b0000_0011];
            replies.extend_from_slice(&id.to_be_bytes());
            replies.extend_from_slice(&answered[cut..]);
            std::fs::write(
                regressions("nbd_replies").join(format!("seed-{name}")),
                &replies,
            )
            .unwrap();
        }
    }

    /// The id the server gave `base:allocation` in its handshake.
    fn context_id(handshake: &[u8]) -> u32 {
        use blkverify_rs::nbd::wire::REP_META_CONTEXT;
        let mut at = 18;
        while at + OptionReply::SIZE <= handshake.len() {
            let head: [u8; OptionReply::SIZE] =
                handshake[at..at + OptionReply::SIZE].try_into().unwrap();
            let reply = OptionReply::decode(&head).unwrap();
            if reply.reply == REP_META_CONTEXT {
                let body = &handshake[at + OptionReply::SIZE..];
                return u32::from_be_bytes(body[..4].try_into().unwrap());
            }
            at += OptionReply::SIZE + reply.length as usize;
        }
        panic!("no base:allocation context in the handshake");
    }
}
