//! `serve`: the mirrored device as an NBD server, so that real software (QEMU,
//! nbdcopy, fio, a file system through nbdfuse, a guest) drives the driver
//! under test while blkverify compares every read.
//!
//! The parts, after nbdkit's `server/protocol*.c`:
//! - `listen`: the socket (a Unix socket in a private directory, or TCP on
//!   loopback) and its URI;
//! - `handshake`: the fixed-newstyle option haggling;
//! - `validate`: every check of a client's request, in one place, before
//!   the device sees it;
//! - `connection`: the request loop of one client;
//! - `execute`: one request run on the device, and what a mismatch does
//!   (`--on-mismatch`);
//! - `status`: block status, from the test side's map, checked against the
//!   reference;
//! - `reply`: simple and structured replies, written in batches;
//! - `finding`: what serve reports.
//!
//! Threads: one thread runs the server (accepts clients, then shuts down),
//! one per client reads its requests. A request that conflicts with nothing
//! in flight runs at once on the client's thread (a thread hand-off would cost
//! more than a page-cached 4 KiB read); one that must wait for an earlier
//! request it overlaps, a flush, and every request when a side is an NBD
//! export (whose latency wants requests in flight) goes to the client's
//! workers. The device numbers and orders every request
//! ([`crate::blkverify::order`]), so both sides see overlapping requests in
//! the same order whatever the connection.
//!
//! A stop (a signal through the caller, a mismatch under `stop`, the last
//! client leaving without `persistent`) stops reading requests at once,
//! answers the ones already received with `ESHUTDOWN`, lets the ones running
//! finish, flushes both sides (a flush that differs is a finding too),
//! closes the images and reports.

mod connection;
mod execute;
mod finding;
mod handshake;
mod inbox;
mod listen;
mod replay;
mod reply;
mod status;
mod validate;

pub use finding::Finding;
pub use listen::Listen;
pub use replay::block_status;

use crate::blkverify::{Blkverify, SideCounts};
use crate::driver::{BlockDriver, OpenOptions};
use crate::error::{Error, Result};
use crate::nbd::Stream;
use listen::Listener;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a mismatch does to the request that found it and to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The request fails with EIO and the server stops (the seed's
    /// behaviour, without its hang).
    Stop,
    /// The request fails with EIO; serving goes on.
    Eio,
    /// The client gets the reference's bytes (or the raw side's result);
    /// serving goes on.
    Reference,
}

impl Policy {
    /// The names `--on-mismatch` takes.
    pub const NAMES: [&'static str; 3] = ["stop", "eio", "reference"];

    /// Parse a policy name.
    pub fn parse(name: &str) -> Result<Policy> {
        match name {
            "stop" => Ok(Policy::Stop),
            "eio" => Ok(Policy::Eio),
            "reference" => Ok(Policy::Reference),
            other => Err(Error::InvalidArgument(format!(
                "on_mismatch '{other}' is not one of {}",
                Policy::NAMES.join(", ")
            ))),
        }
    }
}

/// How long a client may take over its handshake (qemu-nbd's default).
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// The most requests one connection keeps in flight on its workers before
/// it stops reading more (so memory per connection is bounded).
pub const MAX_IN_FLIGHT: usize = 64;

/// How long a client has to send the rest of a request once its first byte
/// has come (a write's data included): a client that stalls in the middle
/// of a request is disconnected. Idle time between requests is not limited.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stop waits for clients to take their last replies before it
/// closes their connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How serve listens and behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen.
    pub listen: Listen,
    /// The export's name (the empty default name is always accepted too).
    pub export_name: String,
    /// Clients served at once (at least 1).
    pub shared: usize,
    /// Keep serving after the last client leaves.
    pub persistent: bool,
    /// What a mismatch does.
    pub on_mismatch: Policy,
    /// How long a client may take over its handshake.
    pub handshake_limit: Duration,
    /// Requests one connection keeps in flight at most.
    pub max_in_flight: usize,
    /// How long a begun request may take to arrive whole.
    pub request_timeout: Duration,
    /// A trace records the requests: each connection to a device with an NBD
    /// side runs its requests one at a time, in number order, so the NBD side
    /// sees them in the order the trace holds and a replay repeats. (Local
    /// files give the same bytes whatever the order of requests that do not
    /// overlap; an NBD side may count requests.)
    pub in_order: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: Listen::TempSocket,
            export_name: String::new(),
            shared: 1,
            persistent: false,
            on_mismatch: Policy::Stop,
            handshake_limit: HANDSHAKE_LIMIT,
            max_in_flight: MAX_IN_FLIGHT,
            request_timeout: REQUEST_TIMEOUT,
            in_order: false,
        }
    }
}

/// Open the device to serve: RAW as the raw reference and TEST with
/// `options`, writable unless `read_only`. A TEST whose format blkverify
/// cannot write is refused unless `read_only` (the driver would otherwise
/// open it read-only and fail every write).
pub fn open_device(
    raw: &Path,
    test: &Path,
    options: &OpenOptions,
    read_only: bool,
) -> Result<Blkverify> {
    let options = OpenOptions {
        writable: !read_only,
        ..options.clone()
    };
    let device = Blkverify::open(raw, test, &options)?;
    if !read_only && device.test().is_read_only() {
        return Err(Error::InvalidArgument(format!(
            "{}: blkverify cannot write {} images; serve it read-only (-r) to export it",
            test.display(),
            device.test().format_name()
        )));
    }
    Ok(device)
}

/// What a serve did, once it has ended.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Requests admitted to the device (the last global request number + 1).
    pub requests: u64,
    /// Requests by command: read, write, write_zeroes, trim, flush, cache,
    /// block_status.
    pub by_command: Vec<(&'static str, u64)>,
    /// Requests refused before the device saw them (bad range, flags...).
    pub refused: u64,
    /// Clients that entered transmission.
    pub connections: u64,
    /// Replies never delivered: the client left while its request ran (the
    /// request still ran on both sides).
    pub dropped_replies: u64,
    /// Requests cut short by the client leaving (a write whose data never
    /// came); not run.
    pub truncated_requests: u64,
    /// Findings.
    pub findings: u64,
    /// Why the server stopped.
    pub stopped_by: String,
    /// From start to the images closing.
    pub elapsed: Duration,
    /// The bytes each side read and wrote.
    pub counts: SideCounts,
    /// The image under test, and its format.
    pub test_image: (String, &'static str),
    /// The raw reference.
    pub raw_image: String,
}

/// Counters the connections share.
#[derive(Default)]
struct Stats {
    by_command: [AtomicU64; 7],
    refused: AtomicU64,
    connections: AtomicU64,
    dropped_replies: AtomicU64,
    truncated_requests: AtomicU64,
    /// Connections dropped because a request they began did not arrive
    /// whole in time (among `truncated_requests`).
    stalled: AtomicU64,
    /// The most requests one connection had on its workers at once.
    peak_in_flight: AtomicU64,
}

/// The command names [`Stats::by_command`] counts, in its order.
const COMMANDS: [&str; 7] = [
    "read",
    "write",
    "write_zeroes",
    "trim",
    "flush",
    "cache",
    "block_status",
];

/// The connections alive, to shut down on a stop.
#[derive(Default)]
struct Registry {
    live: HashMap<u64, Stream>,
    /// Connections accepted so far.
    accepted: u64,
    /// Connections in transmission now (what `shared` limits).
    transmitting: usize,
}

/// What the server's threads and its handle share.
struct Shared {
    stopping: AtomicBool,
    stopped_by: Mutex<Option<String>>,
    waker: UnixStream,
    registry: Mutex<Registry>,
    /// Signalled when a connection ends.
    connection_ended: Condvar,
    findings: Mutex<Vec<Finding>>,
    finding_count: AtomicU64,
    stats: Stats,
    outcome: Mutex<Option<Result<Summary>>>,
    ended: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Fresh shared state, and the reading end of its stop pipe.
    fn new() -> Result<(Shared, UnixStream)> {
        let (waker, wake_reader) = UnixStream::pair()
            .map_err(|e| Error::io(Path::new("serve"), "make the stop pipe", e))?;
        for end in [&waker, &wake_reader] {
            end.set_nonblocking(true)
                .map_err(|e| Error::io(Path::new("serve"), "make the stop pipe", e))?;
        }
        let shared = Shared {
            stopping: AtomicBool::new(false),
            stopped_by: Mutex::new(None),
            waker,
            registry: Mutex::default(),
            connection_ended: Condvar::new(),
            findings: Mutex::default(),
            finding_count: AtomicU64::new(0),
            stats: Stats::default(),
            outcome: Mutex::new(None),
            ended: Condvar::new(),
        };
        Ok((shared, wake_reader))
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stop the server (the first reason is kept) and wake the accept loop.
    fn stop(&self, reason: &str) {
        lock(&self.stopped_by).get_or_insert_with(|| reason.to_string());
        if !self.stopping.swap(true, Ordering::AcqRel) {
            // The waker is non-blocking: a full pipe already wakes the loop.
            let _ = (&self.waker).write(&[1]);
        }
    }

    fn record(&self, finding: Finding) {
        self.finding_count.fetch_add(1, Ordering::Relaxed);
        lock(&self.findings).push(finding);
    }
}

/// A running server: its URI, its findings so far, and a way to stop it.
/// Dropping it stops the server and waits for it to end.
pub struct Server {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    uri: String,
    /// A Unix socket's path and private directory, for [`Server::remove_socket`].
    socket_files: Option<(std::path::PathBuf, Option<std::path::PathBuf>)>,
}

impl Server {
    /// Listen as `options` say and serve `device` on a thread of its own.
    /// Returns once the socket listens: the URI is good to connect to.
    pub fn start(device: Blkverify, options: ServeOptions) -> Result<Server> {
        if options.shared == 0 {
            return Err(Error::InvalidArgument(
                "shared must be at least 1 (clients served at once)".to_string(),
            ));
        }
        let (listener, uri) = Listener::bind(&options.listen, &options.export_name)?;
        let socket_files = listener.socket_files();
        let (shared, wake_reader) = Shared::new()?;
        let shared = Arc::new(shared);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("blkverify-serve".to_string())
            .spawn(move || {
                let started = Instant::now();
                let outcome = run(&device, &options, &thread_shared, &listener, wake_reader);
                drop(listener);
                let counts = device.io_counts();
                let requests = device.order().admitted();
                let images = (
                    (
                        device.test().path().display().to_string(),
                        device.test().format_name(),
                    ),
                    device.raw().path().display().to_string(),
                );
                // Close the images (and release their locks) before reporting.
                drop(device);
                let outcome = outcome.map(|()| Summary {
                    test_image: images.0,
                    raw_image: images.1,
                    ..summarise(&thread_shared, requests, counts, started)
                });
                *lock(&thread_shared.outcome) = Some(outcome);
                thread_shared.ended.notify_all();
            })
            .map_err(|e| Error::io(Path::new("serve"), "start the server thread", e))?;
        Ok(Server {
            shared,
            thread: Some(thread),
            uri,
            socket_files,
        })
    }

    /// The URI clients connect to (`nbd+unix:///?socket=…`, `nbd://HOST:PORT/`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Ask the server to stop (see the module doc); returns at once.
    pub fn stop(&self) {
        self.shared.stop("a stop was asked for");
    }

    /// Ask the server to stop, naming why (a signal, say).
    pub fn stop_because(&self, reason: &str) {
        self.shared.stop(reason);
    }

    /// Wait up to `timeout` (`None`: for ever) for the server to end.
    /// Returns whether it has ended.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut outcome = lock(&self.shared.outcome);
        while outcome.is_none() {
            let left = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
            };
            outcome = self
                .shared
                .ended
                .wait_timeout(outcome, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Remove the Unix socket (and the private directory made for it) now, for
    /// a process about to exit without stopping the server: no stale socket
    /// is left behind. The server ends as usual otherwise.
    pub fn remove_socket(&self) {
        if let Some((path, dir)) = &self.socket_files {
            listen::remove_socket(path, dir.as_deref());
        }
    }

    /// Whether the server is stopping (or has stopped).
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping()
    }

    /// The findings from the `from`-th on, in the order they were found.
    pub fn findings(&self, from: usize) -> Vec<Finding> {
        lock(&self.shared.findings)
            .get(from..)
            .map(<[Finding]>::to_vec)
            .unwrap_or_default()
    }

    /// How many findings there are so far.
    pub fn finding_count(&self) -> u64 {
        self.shared.finding_count.load(Ordering::Relaxed)
    }

    /// Wait for the server to end, and take what it came to: the summary,
    /// or the error that ended it. `None` if it was already taken.
    pub fn take_outcome(&self) -> Option<Result<Summary>> {
        self.wait(None);
        lock(&self.shared.outcome).take()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop("the server handle was dropped");
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the connections of one server share besides [`Shared`].
struct Context<'a> {
    device: &'a Blkverify,
    options: &'a ServeOptions,
    shared: &'a Shared,
    export: Export,
}

/// The export as the handshake describes it.
#[derive(Debug, Clone)]
struct Export {
    name: String,
    size: u64,
    read_only: bool,
    /// Both sides zero without writing (raw files): `FAST_ZERO` can succeed.
    fast_zero: bool,
    /// Both sides are local files: a request that conflicts with nothing runs
    /// on the client's thread.
    inline: bool,
    /// A connection runs its requests on one worker, in number order
    /// (`in_order` with an NBD side).
    one_worker: bool,
    /// More than one client may connect: advertise multi-conn.
    multi_conn: bool,
}

impl Export {
    /// The export of `device` served with `options`.
    fn of(device: &Blkverify, options: &ServeOptions) -> Export {
        let local = |d: &dyn BlockDriver| d.format_name() != "nbd";
        Export {
            name: options.export_name.clone(),
            size: device.size(),
            read_only: device.is_read_only(),
            fast_zero: device.raw().format_name() == "raw" && device.test().format_name() == "raw",
            inline: local(device.raw()) && local(device.test()),
            one_worker: options.in_order && !(local(device.raw()) && local(device.test())),
            multi_conn: options.shared > 1,
        }
    }
}

/// Serve one client already connected on `stream` (one end of a socket
/// pair, say) until it leaves, then flush both sides as a server does at its
/// end; no socket listens. The whole server code runs, from the greeting on:
/// the fuzz target feeds it made-up connections this way, as nbdkit's
/// `server/fuzzer.c` does.
pub fn serve_connection(
    device: &Blkverify,
    options: &ServeOptions,
    stream: Stream,
) -> Result<Summary> {
    let started = Instant::now();
    let (shared, _wake_reader) = Shared::new()?;
    let ctx = Context {
        device,
        options,
        shared: &shared,
        export: Export::of(device, options),
    };
    connection::serve(&ctx, 1, stream);
    if let Err(e) = device.flush() {
        match finding::of_error(device, None, String::new(), &e, None) {
            Some(f) => shared.record(f),
            None => return Err(e),
        }
    }
    Ok(Summary {
        test_image: (
            device.test().path().display().to_string(),
            device.test().format_name(),
        ),
        raw_image: device.raw().path().display().to_string(),
        ..summarise(
            &shared,
            device.order().admitted(),
            device.io_counts(),
            started,
        )
    })
}

/// Accept clients until a stop, then shut the connections down and wait for
/// them; then flush both sides.
fn run(
    device: &Blkverify,
    options: &ServeOptions,
    shared: &Shared,
    listener: &Listener,
    mut wake_reader: UnixStream,
) -> Result<()> {
    let ctx = Context {
        device,
        options,
        shared,
        export: Export::of(device, options),
    };
    let accepted = std::thread::scope(|scope| {
        let result = accept_loop(&ctx, listener, &mut wake_reader, |id, stream| {
            let ctx = &ctx;
            let spawned = std::thread::Builder::new()
                .name(format!("blkverify-serve-{id}"))
                .spawn_scoped(scope, move || {
                    connection::serve(ctx, id, stream);
                    end_connection(ctx, id);
                });
            if spawned.is_err() {
                end_connection(ctx, id);
            }
        });
        shutdown_connections(&ctx);
        result
    });
    // Every connection has ended: what they wrote is on both sides. Make it
    // durable, and compare the two flushes' results once more.
    let flushed = device.flush();
    if let Err(e) = flushed {
        match finding::of_error(device, None, String::new(), &e, None) {
            Some(f) => shared.record(f),
            None => return Err(e),
        }
    }
    accepted
}

/// Accept clients (calling `spawn` with each) until a stop.
fn accept_loop(
    ctx: &Context<'_>,
    listener: &Listener,
    wake_reader: &mut UnixStream,
    mut spawn: impl FnMut(u64, Stream),
) -> Result<()> {
    loop {
        if ctx.shared.stopping() {
            return Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake_reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the whole
        // call, and its length is passed with it.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(Path::new(listener.name()), "wait for clients", e));
        }
        let mut drain = [0u8; 64];
        while matches!(wake_reader.read(&mut drain), Ok(n) if n > 0) {}
        if ctx.shared.stopping() {
            return Ok(());
        }
        loop {
            match listener.accept() {
                Ok(stream) => {
                    let id = {
                        let mut registry = lock(&ctx.shared.registry);
                        registry.accepted += 1;
                        let id = registry.accepted;
                        if let Ok(handle) = stream.try_clone() {
                            registry.live.insert(id, handle);
                        }
                        id
                    };
                    spawn(id, stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A client that left before it was accepted, or a
                // descriptor shortage: not the server's end.
                Err(_) => break,
            }
        }
    }
}

/// A connection ended: forget it, and stop the server when it was the last
/// one and the server is not persistent.
fn end_connection(ctx: &Context<'_>, id: u64) {
    let mut registry = lock(&ctx.shared.registry);
    registry.live.remove(&id);
    let last = registry.live.is_empty();
    drop(registry);
    ctx.shared.connection_ended.notify_all();
    if last && !ctx.options.persistent {
        ctx.shared.stop("the last client left");
    }
}

/// A stop: no connection reads another request; clients get a grace period
/// to take their last replies, then their sockets are closed.
fn shutdown_connections(ctx: &Context<'_>) {
    let deadline = Instant::now() + STOP_GRACE;
    let mut registry = lock(&ctx.shared.registry);
    for stream in registry.live.values() {
        let _ = stream.shutdown_how(Shutdown::Read);
    }
    while !registry.live.is_empty() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            for stream in registry.live.values() {
                let _ = stream.shutdown();
            }
            return;
        };
        registry = ctx
            .shared
            .connection_ended
            .wait_timeout(registry, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

fn summarise(shared: &Shared, requests: u64, counts: SideCounts, started: Instant) -> Summary {
    let stats = &shared.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Summary {
        requests,
        by_command: COMMANDS
            .iter()
            .zip(&stats.by_command)
            .map(|(name, n)| (*name, load(n)))
            .collect(),
        refused: load(&stats.refused),
        connections: load(&stats.connections),
        dropped_replies: load(&stats.dropped_replies),
        truncated_requests: load(&stats.truncated_requests),
        findings: shared.finding_count.load(Ordering::Relaxed),
        stopped_by: lock(&shared.stopped_by)
            .clone()
            .unwrap_or_else(|| "the server stopped".to_string()),
        elapsed: started.elapsed(),
        counts,
        test_image: (String::new(), ""),
        raw_image: String::new(),
    }
}

#[cfg(test)]
mod tests;
