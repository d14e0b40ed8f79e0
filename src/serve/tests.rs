//! The server against real clients: QEMU's (`qemu-img`, `qemu-io`) and our
//! own NBD driver, plus hand-written bytes for what a well-behaved client
//! never sends.

use super::*;
use crate::driver::{self, Mapping};
use crate::nbd::wire::{
    OptionHeader, OptionReply, RequestHeader, SimpleReply, CMD_READ, CMD_WRITE, IHAVEOPT,
    NBD_EINVAL, NBD_ENOSPC, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_STARTTLS, REP_ACK,
    REP_ERR_POLICY, REP_ERR_UNKNOWN, REP_SERVER,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use support::{
    blank_pair, create_qcow2, data_pair, finish, go_data, greet, identical, option, path_str,
    persistent, run, serve_blank, start, SIZE,
};

#[test]
fn qemu_img_converts_in_and_compares_out() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = blank_pair(dir.path());
    // The source: a qcow2 with data, zeros and holes.
    let source = dir.path().join("source.qcow2");
    create_qcow2(&source, SIZE);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 3M 512k",
            "-c",
            "write -P 0x33 7M 4k",
            path_str(&source),
        ],
    );
    let server = start(&raw, &test, persistent());
    let uri = server.uri().to_string();
    assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path_str(&source),
            &uri,
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path_str(&source),
            &uri,
        ],
    );
    let (summary, findings) = finish(server);
    assert!(findings.is_empty(), "{findings:?}");
    assert!(summary.requests > 0);
    assert_eq!(summary.counts.test.written, summary.counts.raw.written);
    assert!(identical(&raw, &test));
    run("qemu-img", &["check", "-q", path_str(&test)]);
    run(
        "qemu-img",
        &["compare", "-q", path_str(&source), path_str(&test)],
    );
}

#[test]
fn a_corrupt_sector_is_named_under_every_policy() {
    for policy in [Policy::Stop, Policy::Eio, Policy::Reference] {
        let dir = tempfile::tempdir().unwrap();
        let (raw, test) = data_pair(dir.path());
        // Flip one data byte of the test image at guest offset 1M + 5000
        // (sector 2057), found through qemu-img map.
        let map = run("qemu-img", &["map", "--output=json", path_str(&test)]);
        let map = String::from_utf8(map.stdout).unwrap();
        let host = host_offset(&map, (1 << 20) + 5000);
        let mut bytes = std::fs::read(&test).unwrap();
        bytes[host as usize] ^= 0x01;
        std::fs::write(&test, &bytes).unwrap();

        let server = start(
            &raw,
            &test,
            ServeOptions {
                on_mismatch: policy,
                ..persistent()
            },
        );
        let uri = server.uri().to_string();
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0xa5 1M 8k", &uri])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        match policy {
            Policy::Reference => assert!(
                stdout.contains("read 8192/8192 bytes")
                    && !stdout.contains("Pattern verification failed"),
                "{stdout}"
            ),
            _ => assert!(!stdout.contains("read 8192/8192"), "{stdout}"),
        }
        if policy == Policy::Stop {
            assert!(
                server.wait(Some(Duration::from_secs(5))),
                "a stop must end serve"
            );
        }
        let (summary, findings) = finish(server);
        assert_eq!(findings.len(), 1, "{policy:?} {findings:?}");
        let f = &findings[0];
        assert_eq!(
            f.difference.message,
            "blkverify: read sector_num=2048 nb_sectors=16 contents mismatch in sector 2057"
        );
        assert_eq!(f.difference.first_byte, Some((1 << 20) + 5000));
        assert_eq!(f.difference.kind, "contents");
        assert_eq!(f.difference.connection, Some(1));
        assert_eq!(f.op.as_deref(), Some("read 1048576 8192"));
        let i = 5000 % 512;
        assert_eq!(f.difference.test_bytes[i] ^ f.difference.raw_bytes[i], 0x01);
        let mapping = f.difference.mapping.as_ref().unwrap();
        assert_eq!(mapping.kind, "data");
        assert_eq!(mapping.host_offset, Some(host));
        assert_eq!(summary.findings, 1);
        if policy == Policy::Stop {
            assert_eq!(summary.stopped_by, "a mismatch (--on-mismatch stop)");
        }
    }
}

/// The host offset of guest byte `guest` in `qemu-img map --output=json`.
fn host_offset(map: &str, guest: u64) -> u64 {
    for line in map.lines() {
        let field = |name: &str| -> Option<u64> {
            let at = line.find(&format!("\"{name}\": "))? + name.len() + 4;
            let rest = &line[at..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            rest[..end].trim().parse().ok()
        };
        let (Some(start), Some(length)) = (field("start"), field("length")) else {
            continue;
        };
        if start <= guest && guest < start + length {
            return field("offset").expect("data is mapped") + (guest - start);
        }
    }
    panic!("{guest} not mapped in {map}");
}

#[test]
fn our_client_reads_writes_and_gets_a_true_map() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = data_pair(dir.path());
    let server = start(&raw, &test, persistent());
    let client = driver::open(
        Path::new(server.uri()),
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(client.size(), SIZE);
    let mut buf = vec![0u8; 65536];
    client.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    client.write_at(&[7u8; 4096], 4 << 20).unwrap();
    client.write_zeroes(0, 4096, true).unwrap();
    client.discard(1 << 20, 65536).unwrap();
    client.flush().unwrap();
    // The map: data at 0 (after the zeroed 4k), zeros at 2M, holes elsewhere.
    let at = |offset| client.map(offset, SIZE - offset).unwrap().mapping;
    assert_eq!(at(8192), Mapping::Data { host_offset: 8192 });
    assert!(
        matches!(at(2 << 20), Mapping::Zero { .. }),
        "{:?}",
        at(2 << 20)
    );
    assert!(matches!(at(6 << 20), Mapping::Zero { .. }));
    drop(client);
    let (summary, findings) = finish(server);
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(summary.connections, 1);
    assert!(identical(&raw, &test));
    run("qemu-img", &["check", "-q", path_str(&test)]);
}

#[test]
fn a_map_that_lies_is_a_finding() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = blank_pair(dir.path());
    // The reference holds data at 3M that the test side does not: its map
    // says zeros there, and a client trusting it would never read.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 3M 4k", path_str(&raw)],
    );
    let server = start(
        &raw,
        &test,
        ServeOptions {
            on_mismatch: Policy::Eio,
            ..persistent()
        },
    );
    let client = driver::open(Path::new(server.uri()), &OpenOptions::default()).unwrap();
    // Our client asks for block status to learn the map.
    let err = client.map(0, SIZE).unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err}");
    drop(client);
    let (_, findings) = finish(server);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(
        findings[0].difference.message,
        format!(
            "blkverify: block_status sector_num=0 nb_sectors={} contents mismatch in sector {}",
            SIZE / 512,
            (3 << 20) / 512
        )
    );
}

#[test]
fn the_handshake_answers_every_option() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = serve_blank(
        dir.path(),
        ServeOptions {
            export_name: "disk".to_string(),
            shared: 1,
            persistent: true,
            ..ServeOptions::default()
        },
    );
    assert!(server.uri().starts_with("nbd+unix:///disk?socket="));
    let mut s = greet(server.uri());
    let list = option(&mut s, OPT_LIST, &[]);
    assert_eq!(list[0].0, REP_SERVER);
    assert_eq!(&list[0].1[4..], b"disk");
    assert_eq!(list[1].0, REP_ACK);
    assert_eq!(option(&mut s, OPT_STARTTLS, &[])[0].0, REP_ERR_POLICY);
    assert_eq!(
        option(&mut s, OPT_GO, &go_data("other"))[0].0,
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        option(&mut s, 42, b"junk")[0].0,
        crate::nbd::wire::REP_ERR_UNSUP
    );
    let go = option(&mut s, OPT_GO, &go_data("disk"));
    assert_eq!(go.last().unwrap().0, REP_ACK);
    // A second client over --shared 1 is refused with a message.
    let mut second = greet(server.uri());
    let refused = option(&mut second, OPT_GO, &go_data(""));
    assert_eq!(refused[0].0, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&refused[0].1).contains("--shared 1"));
    drop(second);

    // Transmission, simple replies: a read, a read past the end, an
    // unknown command, a write past the end (its data skipped).
    let request = |command, offset, length, cookie| RequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    let reply = |s: &mut UnixStream| {
        let mut head = [0u8; SimpleReply::SIZE];
        s.read_exact(&mut head).unwrap();
        SimpleReply::decode_body(&head[4..].try_into().unwrap())
    };
    s.write_all(&request(CMD_READ, 0, 512, 1).encode()).unwrap();
    assert_eq!(
        reply(&mut s),
        SimpleReply {
            error: 0,
            cookie: 1
        }
    );
    let mut data = [1u8; 512];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0u8; 512]);
    s.write_all(&request(CMD_READ, SIZE, 512, 2).encode())
        .unwrap();
    assert_eq!(reply(&mut s).error, NBD_EINVAL);
    s.write_all(&request(77, 0, 512, 3).encode()).unwrap();
    assert_eq!(reply(&mut s).error, NBD_EINVAL);
    s.write_all(&request(CMD_WRITE, SIZE, 512, 4).encode())
        .unwrap();
    s.write_all(&[9u8; 512]).unwrap();
    assert_eq!(reply(&mut s).error, NBD_ENOSPC);
    s.write_all(&request(CMD_READ, 512, 512, 5).encode())
        .unwrap();
    assert_eq!(
        reply(&mut s),
        SimpleReply {
            error: 0,
            cookie: 5
        }
    );
    s.read_exact(&mut data).unwrap();
    // Bad magic: the server hangs up.
    s.write_all(&[0u8; RequestHeader::SIZE]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let (summary, findings) = finish(server);
    assert!(findings.is_empty());
    assert_eq!(summary.refused, 3);
}

#[test]
fn export_name_with_the_oldstyle_option_and_an_unknown_name_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = serve_blank(dir.path(), persistent());
    let mut s = greet(server.uri());
    s.write_all(&OptionHeader::message(OPT_EXPORT_NAME, b"nope"))
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let mut s = greet(server.uri());
    s.write_all(&OptionHeader::message(OPT_EXPORT_NAME, b""))
        .unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
    drop(s);
    finish(server);
}

#[test]
fn a_stalled_handshake_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = serve_blank(
        dir.path(),
        ServeOptions {
            handshake_limit: Duration::from_millis(300),
            ..persistent()
        },
    );
    let mut s = greet(server.uri());
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(5));
    finish(server);
}

#[test]
fn without_persistent_serve_ends_when_the_last_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = data_pair(dir.path());
    let server = start(&raw, &test, ServeOptions::default());
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 0 64k", server.uri()],
    );
    assert!(server.wait(Some(Duration::from_secs(10))));
    let summary = server.take_outcome().unwrap().unwrap();
    assert_eq!(summary.stopped_by, "the last client left");
    assert!(server.findings(0).is_empty());
}

#[test]
fn tcp_on_a_free_port() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = data_pair(dir.path());
    let server = start(
        &raw,
        &test,
        ServeOptions {
            listen: Listen::Tcp {
                bind: "127.0.0.1".to_string(),
                port: 0,
            },
            ..persistent()
        },
    );
    let uri = server.uri().to_string();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && !uri.ends_with(":0/"),
        "{uri}"
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xa5 1M 128k", &uri],
    );
    let (_, findings) = finish(server);
    assert!(findings.is_empty());
}

#[test]
fn a_format_we_cannot_write_needs_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = data_pair(dir.path());
    let vmdk = dir.path().join("test.vmdk");
    run(
        "qemu-img",
        &["convert", "-O", "vmdk", path_str(&test), path_str(&vmdk)],
    );
    let err = open_device(&raw, &vmdk, &OpenOptions::default(), false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("read-only (-r)"), "{err}");
    let device = open_device(&raw, &vmdk, &OpenOptions::default(), true).unwrap();
    let server = Server::start(device, persistent()).unwrap();
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xa5 1M 128k",
            server.uri(),
        ],
    );
    // The export says it is read-only: a client that wants to write is told.
    let writable = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let err = driver::open(Path::new(server.uri()), &writable)
        .err()
        .unwrap();
    assert!(err.to_string().contains("Read-only"), "{err}");
    let (_, findings) = finish(server);
    assert!(findings.is_empty());
}

#[test]
fn overlapping_requests_from_four_connections_give_no_false_alarm() {
    // Four clients, each with eight requests in flight, write and read the
    // same 64 KiB at random: if the two sides ever saw two overlapping
    // requests in different orders, a read would differ.
    let dir = tempfile::tempdir().unwrap();
    let (raw, test, server) = serve_blank(dir.path(), persistent());
    let uri = server.uri().to_string();
    std::thread::scope(|scope| {
        for client in 0..4u64 {
            let uri = &uri;
            scope.spawn(move || {
                let writable = OpenOptions {
                    writable: true,
                    ..OpenOptions::default()
                };
                let nbd = driver::open(Path::new(uri), &writable).unwrap();
                let nbd = nbd.as_ref();
                std::thread::scope(|inner| {
                    for worker in 0..8u64 {
                        inner.spawn(move || {
                            let mut state = client * 1000 + worker + 1;
                            let mut next = || {
                                state ^= state << 13;
                                state ^= state >> 7;
                                state ^= state << 17;
                                state
                            };
                            let mut buf = vec![0u8; 16384];
                            for _ in 0..150 {
                                let sectors = 1 + next() % 32;
                                let offset = (next() % (128 - sectors)) * 512;
                                let data = buf.get_mut(..(sectors * 512) as usize).unwrap();
                                if next() % 2 == 0 {
                                    data.fill(next() as u8);
                                    nbd.write_at(data, offset).unwrap();
                                } else {
                                    nbd.read_at(data, offset).unwrap();
                                }
                            }
                        });
                    }
                });
            });
        }
    });
    let (summary, findings) = finish(server);
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(summary.connections, 4);
    assert!(summary.requests >= 4 * 8 * 150, "{summary:?}");
    assert!(identical(&raw, &test));
}

mod hostile;
mod support;
