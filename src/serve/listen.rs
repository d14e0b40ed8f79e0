//! Where serve listens: a Unix socket (by default in a private directory of
//! its own, mode 0700, the socket 0600) or a TCP port (on loopback unless
//! told otherwise), and the URI a client connects to.

use crate::error::{Error, Result};
use crate::nbd::{format_uri, Address, Stream};
use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A fresh socket in a private temporary directory (removed at the end).
    TempSocket,
    /// A Unix socket at this path, which must not exist yet (removed at the
    /// end).
    Socket(PathBuf),
    /// A TCP port (0 picks a free one) on this address.
    Tcp {
        /// The address to bind (`127.0.0.1` unless the user names another).
        bind: String,
        /// The port.
        port: u16,
    },
}

/// A bound, non-blocking listening socket.
pub(super) enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// The private directory we made for it.
        dir: Option<PathBuf>,
    },
    Tcp {
        listener: TcpListener,
        name: String,
    },
}

impl Listener {
    /// Bind as `listen` says; returns the listener and the URI of `export`
    /// on it.
    pub fn bind(listen: &Listen, export: &str) -> Result<(Listener, String)> {
        let listener = match listen {
            Listen::TempSocket => {
                let dir = private_dir()?;
                let path = dir.join("nbd.sock");
                match bind_unix(&path) {
                    Ok(listener) => Listener::Unix {
                        listener,
                        path,
                        dir: Some(dir),
                    },
                    Err(e) => {
                        let _ = fs::remove_dir(&dir);
                        return Err(e);
                    }
                }
            }
            Listen::Socket(path) => {
                if fs::symlink_metadata(path).is_ok() {
                    return Err(Error::io(
                        path,
                        "listen",
                        io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "the path already exists (another server's socket?); remove it or choose another",
                        ),
                    ));
                }
                Listener::Unix {
                    listener: bind_unix(path)?,
                    path: path.clone(),
                    dir: None,
                }
            }
            Listen::Tcp { bind, port } => {
                let where_ = format!("{bind}:{port}");
                let fail = |e| Error::io(Path::new(&where_), "listen", e);
                let addr = (bind.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(fail)?
                    .next()
                    .ok_or_else(|| {
                        fail(io::Error::new(
                            io::ErrorKind::NotFound,
                            "the address resolves to nothing",
                        ))
                    })?;
                let listener = TcpListener::bind(addr).map_err(fail)?;
                listener.set_nonblocking(true).map_err(fail)?;
                let local = listener.local_addr().map_err(fail)?;
                Listener::Tcp {
                    listener,
                    name: local.to_string(),
                }
            }
        };
        let address = match &listener {
            Listener::Unix { path, .. } => Address::Unix {
                socket: path.clone(),
            },
            Listener::Tcp { listener, name } => {
                let local = listener
                    .local_addr()
                    .map_err(|e| Error::io(Path::new(name), "listen", e))?;
                Address::Tcp {
                    host: local.ip().to_string(),
                    port: local.port(),
                }
            }
        };
        let uri = format_uri(&address, export);
        Ok((listener, uri))
    }

    /// Accept a waiting client: a blocking socket (TCP without Nagle's
    /// delay). `WouldBlock` when none waits.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(false)?;
                Ok(Stream::Unix(stream))
            }
            Listener::Tcp { listener, .. } => {
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(false)?;
                let _ = stream.set_nodelay(true);
                Ok(Stream::Tcp(stream))
            }
        }
    }

    /// The socket's path or address, for messages.
    pub fn name(&self) -> &str {
        listener_name(self)
    }

    /// What [`remove_socket`] removes: a Unix socket's path and the private
    /// directory made for it.
    pub fn socket_files(&self) -> Option<(PathBuf, Option<PathBuf>)> {
        match self {
            Listener::Unix { path, dir, .. } => Some((path.clone(), dir.clone())),
            Listener::Tcp { .. } => None,
        }
    }
}

/// Remove a Unix socket and the private directory made for it (errors are
/// ignored: it may be gone already).
pub(super) fn remove_socket(path: &Path, dir: Option<&Path>) {
    let _ = fs::remove_file(path);
    if let Some(dir) = dir {
        let _ = fs::remove_dir(dir);
    }
}

fn listener_name(listener: &Listener) -> &str {
    match listener {
        Listener::Unix { path, .. } => path.to_str().unwrap_or("the socket"),
        Listener::Tcp { name, .. } => name,
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
            Listener::Tcp { listener, .. } => listener.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, dir, .. } = self {
            remove_socket(path, dir.as_deref());
        }
    }
}

/// Bind a non-blocking Unix socket at `path`, readable and writable by its
/// owner only.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    let fail = |e| Error::io(path, "listen", e);
    let listener = UnixListener::bind(path).map_err(fail)?;
    let setup = fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .and_then(|()| listener.set_nonblocking(true));
    if let Err(e) = setup {
        let _ = fs::remove_file(path);
        return Err(fail(e));
    }
    Ok(listener)
}

/// A new directory only we can enter, under the temporary directory.
fn private_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let dir = base.join(format!("blkverify-serve-{:016x}", h.finish()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::io(
                    &dir,
                    "make a private directory for the socket",
                    e,
                ))
            }
        }
    }
    Err(Error::io(
        &base,
        "make a private directory for the socket",
        last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
    ))
}
