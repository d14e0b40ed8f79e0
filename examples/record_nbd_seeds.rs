//! Record the NBD fuzz targets' seeds (run by hand, then commit the files):
//!
//!     cargo run --release --example record_nbd_seeds
//!
//! Real clients (qemu-io, qemu-img convert and map, nbdinfo, nbdcopy) talk to
//! serve through a recording proxy: what they send is a `serve_connection`
//! seed. Our client's fuzz session (`fuzzing::nbd_client_session`) talks to
//! real servers (qemu-nbd, nbdkit): what they answer is an `nbd_handshake`
//! seed, and its replies after the handshake an `nbd_replies` seed.
//! tests/fuzz_regressions.rs replays them all.

use blkverify_rs::fuzzing;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn main() {
    all();
}

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

fn all() {
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
