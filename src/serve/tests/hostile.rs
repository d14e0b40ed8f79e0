//! Hostile and broken clients, in raw bytes over the socket: each case of
//! issue 21 gets the protocol's error or a disconnect, and afterwards the
//! server still serves another client, which then works (QEMU's `qemu-io`
//! reads and writes through it). Nothing a refused request names is written.

use super::support::pair_of;
use super::*;
use crate::nbd::wire::{
    ChunkHeader, BASE_ALLOCATION, CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES,
    INFO_BLOCK_SIZE, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_OFFSET_DATA,
    REP_META_CONTEXT, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use std::io::ErrorKind;

/// 64 MiB + 1 MiB: room for a trim and a block status over the maximum.
const BIG: u64 = 65 << 20;

/// A client speaking raw bytes.
struct Client {
    s: UnixStream,
    structured: bool,
}

impl Client {
    /// Connect, haggle and go into transmission: structured replies with
    /// `base:allocation` and the block size agreed, or simple replies with
    /// nothing else.
    fn go(uri: &str, structured: bool) -> Client {
        let mut s = greet(uri);
        let mut info = go_data("");
        if structured {
            assert_eq!(option(&mut s, OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
            let mut meta = 0u32.to_be_bytes().to_vec();
            meta.extend_from_slice(&1u32.to_be_bytes());
            meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
            s.write_all(&OptionHeader::message(OPT_SET_META_CONTEXT, &meta))
                .unwrap();
            let mut head = [0u8; OptionReply::SIZE];
            for expected in [REP_META_CONTEXT, REP_ACK] {
                s.read_exact(&mut head).unwrap();
                let reply = OptionReply::decode(&head).unwrap();
                assert_eq!(reply.reply, expected);
                let mut data = vec![0u8; reply.length as usize];
                s.read_exact(&mut data).unwrap();
            }
            info.truncate(info.len() - 2);
            info.extend_from_slice(&1u16.to_be_bytes());
            info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        }
        let go = option(&mut s, OPT_GO, &info);
        assert_eq!(go.last().unwrap().0, REP_ACK, "{go:?}");
        Client { s, structured }
    }

    fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, cookie: u64) {
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&header.encode()).unwrap();
    }

    /// One whole reply: its cookie, its NBD error (0 on success) and its
    /// data (a read's).
    fn reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>) {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                assert!(!self.structured || read_len == 0);
                let mut body = [0u8; 12];
                self.s.read_exact(&mut body).unwrap();
                let reply = SimpleReply::decode_body(&body);
                let mut data = vec![0u8; if reply.error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).unwrap();
                (reply.cookie, reply.error, data)
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(self.structured);
                let (mut error, mut data) = (0, Vec::new());
                let mut chunk = ChunkHeader {
                    flags: 0,
                    kind: 0,
                    cookie: 0,
                    length: 0,
                };
                let mut first = true;
                while first || chunk.flags & REPLY_FLAG_DONE == 0 {
                    if !first {
                        self.s.read_exact(&mut magic).unwrap();
                        assert_eq!(u32::from_be_bytes(magic), STRUCTURED_REPLY_MAGIC);
                    }
                    first = false;
                    let mut body = [0u8; 16];
                    self.s.read_exact(&mut body).unwrap();
                    chunk = ChunkHeader::decode_body(&body);
                    let mut payload = vec![0u8; chunk.length as usize];
                    self.s.read_exact(&mut payload).unwrap();
                    if chunk.kind & REPLY_TYPE_ERROR_BIT != 0 {
                        error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    } else if chunk.kind == REPLY_TYPE_OFFSET_DATA {
                        data.extend_from_slice(&payload[8..]);
                    }
                }
                (chunk.cookie, error, data)
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Send a request and take its reply's error.
    fn error_of(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.send(command, flags, offset, length, 77);
        if command == CMD_WRITE {
            write_zeros(&mut self.s, u64::from(length));
        }
        let read_len = if command == CMD_READ {
            length as usize
        } else {
            0
        };
        let (cookie, error, _) = self.reply(read_len);
        assert_eq!(cookie, 77);
        error
    }

    /// The server closes the connection (within a few seconds).
    fn closed(mut self) {
        self.s
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        match self.s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{} bytes after the end", rest.len()),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

fn write_zeros(s: &mut UnixStream, mut n: u64) {
    let zeros = vec![0u8; 1 << 20];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        s.write_all(&zeros[..k]).unwrap();
        n -= k as u64;
    }
}

/// Another client works: QEMU writes and reads back a pattern.
fn another_client_works(uri: &str, offset: u64) {
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x5c {offset} 4k"),
            "-c",
            &format!("read -P 0x5c {offset} 4k"),
            uri,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("failed"), "{stdout}");
}

#[test]
fn requests_past_the_end_and_over_the_maximum_get_the_specs_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = pair_of(dir.path(), BIG);
    let server = start(&raw, &test, persistent());
    for structured in [true, false] {
        let mut c = Client::go(server.uri(), structured);
        let over = (32 << 20) + 512;
        // Past the end: reads and trims EINVAL, writes ENOSPC.
        assert_eq!(c.error_of(CMD_READ, 0, BIG, 512), NBD_EINVAL);
        assert_eq!(c.error_of(CMD_READ, 0, BIG - 512, 1024), NBD_EINVAL);
        assert_eq!(c.error_of(CMD_WRITE, 0, BIG - 512, 1024), NBD_ENOSPC);
        assert_eq!(c.error_of(CMD_WRITE_ZEROES, 0, BIG, 512), NBD_ENOSPC);
        assert_eq!(c.error_of(CMD_TRIM, 0, BIG, 512), NBD_EINVAL);
        assert_eq!(c.error_of(CMD_CACHE, 0, BIG, 512), NBD_EINVAL);
        // An offset + length that overflows 64 bits.
        assert_eq!(c.error_of(CMD_READ, 0, u64::MAX - 511, 1024), NBD_EINVAL);
        assert_eq!(c.error_of(CMD_WRITE, 0, u64::MAX - 511, 1024), NBD_ENOSPC);
        // Over 32 MiB: reads and writes EINVAL (the write's data is read
        // through, and the connection goes on); cache and write zeroes, which
        // carry no data, EOVERFLOW; trim any length.
        assert_eq!(c.error_of(CMD_READ, 0, 0, over), NBD_EINVAL);
        assert_eq!(c.error_of(CMD_WRITE, 0, 0, over), NBD_EINVAL);
        assert_eq!(c.error_of(CMD_CACHE, 0, 0, over), NBD_EOVERFLOW);
        assert_eq!(c.error_of(CMD_WRITE_ZEROES, 0, 0, over), NBD_EOVERFLOW);
        assert_eq!(c.error_of(CMD_TRIM, 0, 0, BIG as u32), 0);
        // Exactly 32 MiB, ending at the end, is fine.
        assert_eq!(c.error_of(CMD_READ, 0, BIG - (32 << 20), 32 << 20), 0);
        if structured {
            // Block status of any length, past the end EINVAL.
            assert_eq!(c.error_of(CMD_BLOCK_STATUS, 0, 0, BIG as u32), 0);
            assert_eq!(c.error_of(CMD_BLOCK_STATUS, 0, BIG, 512), NBD_EINVAL);
            // The client agreed to 512-byte blocks: unaligned is EINVAL.
            assert_eq!(c.error_of(CMD_READ, 0, 100, 512), NBD_EINVAL);
            assert_eq!(c.error_of(CMD_WRITE, 0, 512, 100), NBD_EINVAL);
        }
        // The connection still works.
        assert_eq!(c.error_of(CMD_READ, 0, 4096, 4096), 0);
        // A write whose data is over 64 MiB is not read through: hang up.
        c.send(CMD_WRITE, 0, 0, (64 << 20) + 512, 9);
        c.closed();
    }
    another_client_works(server.uri(), BIG - 4096);
    let (summary, findings) = finish(server);
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(summary.refused, 2 * 12 + 3 + 2);
    // The refused requests wrote nothing: the reference is still all zeros
    // but for the trim (nothing) and qemu-io's last 4 KiB.
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..(BIG - 4096) as usize].iter().all(|&b| b == 0));
    assert!(bytes[(BIG - 4096) as usize..].iter().all(|&b| b == 0x5c));
    assert!(identical(&raw, &test));
}

#[test]
fn unknown_commands_and_flags_and_flags_on_the_wrong_command_are_einval() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test, server) = serve_blank(dir.path(), persistent());
    let mut c = Client::go(server.uri(), true);
    assert_eq!(c.error_of(8, 0, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(0xffff, 0, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_READ, 1 << 5, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_READ, 0x8000, 0, 512), NBD_EINVAL);
    // Each flag on a command it does not apply to.
    assert_eq!(c.error_of(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_WRITE, CMD_FLAG_DF, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_FLUSH, 0, 512, 0), NBD_EINVAL);
    // ...and on the ones they apply to, accepted.
    assert_eq!(c.error_of(CMD_WRITE, CMD_FLAG_FUA, 0, 512), 0);
    assert_eq!(c.error_of(CMD_READ, CMD_FLAG_DF, 0, 512), 0);
    assert_eq!(c.error_of(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512), 0);
    assert_eq!(c.error_of(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096), 0);
    // FAST_ZERO on a qcow2 test side would not be fast.
    assert_eq!(
        c.error_of(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512),
        NBD_ENOTSUP
    );
    // Block status without base:allocation is EINVAL; simple replies have
    // no DF.
    let mut plain = Client::go(server.uri(), false);
    assert_eq!(plain.error_of(CMD_BLOCK_STATUS, 0, 0, 512), NBD_EINVAL);
    assert_eq!(plain.error_of(CMD_READ, CMD_FLAG_DF, 0, 512), NBD_EINVAL);
    assert_eq!(plain.error_of(CMD_READ, 0, 0, 512), 0);
    drop(plain);
    // A bad magic ends the connection.
    c.s.write_all(&[0x25, 0x60, 0x95, 0x14]).unwrap();
    c.s.write_all(&[0u8; RequestHeader::SIZE - 4]).unwrap();
    c.closed();
    another_client_works(server.uri(), 0);
    let (summary, findings) = finish(server);
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(summary.refused, 12);
    assert!(identical(&raw, &test));
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = blank_pair(dir.path());
    let device = open_device(&raw, &test, &OpenOptions::default(), true).unwrap();
    let server = Server::start(device, persistent()).unwrap();
    let mut c = Client::go(server.uri(), true);
    assert_eq!(c.error_of(CMD_WRITE, 0, 0, 512), NBD_EPERM);
    assert_eq!(c.error_of(CMD_TRIM, 0, 0, 512), NBD_EPERM);
    assert_eq!(c.error_of(CMD_WRITE_ZEROES, 0, 0, 512), NBD_EPERM);
    // FUA was not offered on a read-only export.
    assert_eq!(c.error_of(CMD_READ, CMD_FLAG_FUA, 0, 512), NBD_EINVAL);
    assert_eq!(c.error_of(CMD_READ, 0, 0, 512), 0);
    drop(c);
    finish(server);
}

#[test]
fn truncated_packets_and_a_write_whose_data_never_comes() {
    let dir = tempfile::tempdir().unwrap();
    let limit = Duration::from_millis(1500);
    let (raw, test, server) = serve_blank(
        dir.path(),
        ServeOptions {
            request_timeout: limit,
            ..persistent()
        },
    );
    // Half a header, then the client leaves: the request never ran.
    let mut c = Client::go(server.uri(), true);
    c.s.write_all(
        &RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode()[..15],
    )
    .unwrap();
    drop(c);
    // A write's header, half its data, and the client leaves.
    let mut c = Client::go(server.uri(), true);
    c.send(CMD_WRITE, 0, 0, 4096, 2);
    c.s.write_all(&[0xee; 2048]).unwrap();
    drop(c);
    // A write's header and no data, the client staying: it holds nothing.
    // Another client writes and reads the same range at once.
    let mut stalled = Client::go(server.uri(), true);
    stalled.send(CMD_WRITE, 0, 0, 65536, 3);
    stalled.s.write_all(&[0xee; 100]).unwrap();
    let started = Instant::now();
    let mut other = Client::go(server.uri(), true);
    let payload = [0x42u8; 65536];
    other.send(CMD_WRITE, 0, 0, 65536, 4);
    other.s.write_all(&payload).unwrap();
    assert_eq!(other.reply(0).1, 0);
    other.send(CMD_READ, 0, 0, 65536, 5);
    let (_, error, data) = other.reply(65536);
    assert_eq!(error, 0);
    assert_eq!(data, payload);
    assert!(
        started.elapsed() < limit,
        "the stalled write held the device for {:?}",
        started.elapsed()
    );
    // After the limit the stalled client is disconnected, with no reply.
    let waited = Instant::now();
    stalled.closed();
    assert!(waited.elapsed() >= limit / 2, "{:?}", waited.elapsed());
    assert!(waited.elapsed() < limit * 4, "{:?}", waited.elapsed());
    // Half a header and a stall: cut off too.
    let mut half = Client::go(server.uri(), true);
    half.s.write_all(&[0x25, 0x60, 0x95]).unwrap();
    half.closed();
    drop(other);
    another_client_works(server.uri(), 8192);
    let stalled_count = server.shared.stats.stalled.load(Ordering::Relaxed);
    let (summary, findings) = finish(server);
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(summary.truncated_requests, 4);
    assert_eq!(stalled_count, 2);
    // None of the cut-short writes ran: only the other client's 0x42 and
    // qemu-io's 0x5c are on the reference.
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..8192].iter().all(|&b| b == 0x42));
    assert!(bytes[8192..12288].iter().all(|&b| b == 0x5c));
    assert!(bytes[12288..65536].iter().all(|&b| b == 0x42));
    assert!(bytes[65536..].iter().all(|&b| b == 0));
    assert!(identical(&raw, &test));
}

#[test]
fn endless_option_haggling_and_oversized_options_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = serve_blank(dir.path(), persistent());
    // 256 options are answered; the 257th is never read.
    let mut s = greet(server.uri());
    for _ in 0..handshake::MAX_OPTIONS {
        assert_eq!(option(&mut s, OPT_LIST, &[]).last().unwrap().0, REP_ACK);
    }
    // The server may have hung up already: the write may fail.
    let _ = s.write_all(&OptionHeader::message(OPT_LIST, &[]));
    Client {
        s,
        structured: false,
    }
    .closed();
    // Option data over 256 KiB: hang up without reading it.
    let mut s = greet(server.uri());
    let mut head = IHAVEOPT.to_be_bytes().to_vec();
    head.extend_from_slice(&OPT_GO.to_be_bytes());
    head.extend_from_slice(&((256u32 << 10) + 1).to_be_bytes());
    s.write_all(&head).unwrap();
    Client {
        s,
        structured: false,
    }
    .closed();
    // A bad option magic, and unknown client flags.
    let mut s = greet(server.uri());
    s.write_all(&[0u8; OptionHeader::SIZE]).unwrap();
    Client {
        s,
        structured: false,
    }
    .closed();
    let socket = server.uri().split("socket=").nth(1).unwrap().to_string();
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    Client {
        s,
        structured: false,
    }
    .closed();
    another_client_works(server.uri(), 0);
    let (_, findings) = finish(server);
    assert!(findings.is_empty());
}

#[test]
fn a_stalled_handshake_holds_no_place_and_is_cut_at_its_limit() {
    assert_eq!(HANDSHAKE_LIMIT, Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let limit = Duration::from_millis(1000);
    let (_, _, server) = serve_blank(
        dir.path(),
        ServeOptions {
            handshake_limit: limit,
            shared: 1,
            ..persistent()
        },
    );
    // Two clients stall, one before any option, one in the middle of one;
    // with --shared 1 a third still gets in, at once.
    let idle = greet(server.uri());
    let mut partial = greet(server.uri());
    partial.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    let started = Instant::now();
    another_client_works(server.uri(), 0);
    assert!(started.elapsed() < limit);
    for s in [idle, partial] {
        Client {
            s,
            structured: false,
        }
        .closed();
    }
    assert!(started.elapsed() >= limit / 2);
    assert!(started.elapsed() < 5 * limit);
    another_client_works(server.uri(), 4096);
    finish(server);
}

#[test]
fn more_clients_than_shared_are_refused_until_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = serve_blank(
        dir.path(),
        ServeOptions {
            shared: 2,
            ..persistent()
        },
    );
    let a = Client::go(server.uri(), true);
    let b = Client::go(server.uri(), false);
    // A third: refused at GO with POLICY and a message, and may go on
    // haggling; with NBD_OPT_EXPORT_NAME, which has no error, hung up on.
    let mut third = greet(server.uri());
    let refused = option(&mut third, OPT_GO, &go_data(""));
    assert_eq!(refused[0].0, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&refused[0].1).contains("--shared 2"));
    assert_eq!(option(&mut third, OPT_LIST, &[]).last().unwrap().0, REP_ACK);
    let mut fourth = greet(server.uri());
    fourth
        .write_all(&OptionHeader::message(OPT_EXPORT_NAME, b""))
        .unwrap();
    Client {
        s: fourth,
        structured: false,
    }
    .closed();
    // One leaves: the third gets in.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let go = option(&mut third, OPT_GO, &go_data(""));
        if go.last().unwrap().0 == REP_ACK {
            break;
        }
        assert_eq!(go[0].0, REP_ERR_POLICY);
        assert!(Instant::now() < deadline, "the place was not given back");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut third = Client {
        s: third,
        structured: false,
    };
    assert_eq!(third.error_of(CMD_READ, 0, 0, 4096), 0);
    drop((b, third));
    let (summary, _) = finish(server);
    assert_eq!(summary.connections, 3);
}

#[test]
fn more_requests_in_flight_than_the_cap_wait_in_the_socket() {
    // FUA writes all go to the workers: 200 of them sent at once, none of
    // the replies read until all are sent. The connection never has more
    // than the cap in flight (its reader stops reading: the rest wait in
    // the socket's buffers, TCP's own backpressure), and every one is
    // answered.
    for cap in [4, MAX_IN_FLIGHT] {
        let dir = tempfile::tempdir().unwrap();
        let (raw, test, server) = serve_blank(
            dir.path(),
            ServeOptions {
                max_in_flight: cap,
                ..persistent()
            },
        );
        let mut c = Client::go(server.uri(), true);
        let mut sender = c.s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..200u64 {
                let header = RequestHeader {
                    flags: CMD_FLAG_FUA,
                    command: CMD_WRITE,
                    cookie: i,
                    offset: (i % 16) * 4096,
                    length: 4096,
                };
                sender.write_all(&header.encode()).unwrap();
                sender.write_all(&[i as u8; 4096]).unwrap();
            }
        });
        let mut cookies: Vec<u64> = (0..200)
            .map(|_| c.reply(0))
            .map(|r| {
                assert_eq!(r.1, 0);
                r.0
            })
            .collect();
        writer.join().unwrap();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..200).collect::<Vec<_>>());
        drop(c);
        let peak = |s: &Server| s.shared.stats.peak_in_flight.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while peak(&server) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = peak(&server) as usize;
        assert!(seen >= 1 && seen <= cap, "cap {cap}: {seen} in flight");
        let (_, findings) = finish(server);
        assert!(findings.is_empty());
        assert!(identical(&raw, &test));
    }
}

#[test]
fn a_client_that_reads_no_replies_holds_nothing_of_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = serve_blank(dir.path(), persistent());
    // 64 reads of 1 MiB, and never a reply read: serve's writes block.
    let mut greedy = Client::go(server.uri(), true);
    for i in 0..64u64 {
        greedy.send(CMD_READ, 0, (i % 8) << 20, 1 << 20, i);
    }
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile another client writes and reads the same range.
    let started = Instant::now();
    another_client_works(server.uri(), 4096);
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(greedy);
    let (summary, findings) = finish(server);
    assert!(findings.is_empty());
    assert!(summary.dropped_replies > 0, "{summary:?}");
}
