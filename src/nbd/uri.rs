//! NBD URIs (the NBD project's `nbd://` and `nbd+unix://` syntax, as qemu
//! and libnbd read them): where the export lives, and its name.

use std::path::PathBuf;

/// Where an NBD export lives, parsed from an `nbd://` or `nbd+unix://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `nbd://HOST[:PORT]/EXPORT`
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (default 10809).
        port: u16,
    },
    /// `nbd+unix:///EXPORT?socket=PATH`
    Unix {
        /// The socket path.
        socket: PathBuf,
    },
}

/// Whether `spec` is an NBD URI.
pub fn is_uri(spec: &str) -> bool {
    spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") || spec.starts_with("nbd+tcp://")
}

/// Percent-encode `s` for a URI's path or query value: everything but
/// unreserved characters (and `/` in a path) is escaped.
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URI of `export` at `address`, as [`parse_uri`] reads it back:
/// `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT` (an IPv6
/// host in brackets).
pub fn format_uri(address: &Address, export: &str) -> String {
    let export = percent_encode(export, true);
    match address {
        Address::Unix { socket } => format!(
            "nbd+unix:///{export}?socket={}",
            percent_encode(&socket.to_string_lossy(), true)
        ),
        Address::Tcp { host, port } if host.contains(':') => {
            format!("nbd://[{host}]:{port}/{export}")
        }
        Address::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at position {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "export name is not UTF-8".to_string())
}

/// Parse an NBD URI into an address and an export name.
pub fn parse_uri(uri: &str) -> std::result::Result<(Address, String), String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| "not a URI".to_string())?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i).unwrap_or(""), rest.get(i + 1..).unwrap_or("")),
        None => (rest, ""),
    };
    let export = percent_decode(path)?;
    let param = |name: &str| -> Option<String> {
        query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| percent_decode(v).ok()).flatten()
        })
    };
    match scheme {
        "nbd" | "nbd+tcp" => {
            if authority.is_empty() {
                return Err("an nbd:// URI needs a host".to_string());
            }
            let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
                let (host, after) = stripped
                    .split_once(']')
                    .ok_or_else(|| "unclosed '[' in host".to_string())?;
                let port = after.strip_prefix(':');
                (host.to_string(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err("an nbd:// URI needs a host".to_string());
            }
            let port = match port {
                None | Some("") => 10809,
                Some(p) => p.parse().map_err(|_| format!("bad port '{p}'"))?,
            };
            Ok((Address::Tcp { host, port }, export))
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(
                    "an nbd+unix:// URI has no host (use nbd+unix:///EXPORT?socket=PATH)"
                        .to_string(),
                );
            }
            let socket = param("socket")
                .ok_or_else(|| "an nbd+unix:// URI needs ?socket=PATH".to_string())?;
            Ok((
                Address::Unix {
                    socket: PathBuf::from(socket),
                },
                export,
            ))
        }
        other => Err(format!("unsupported URI scheme '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standard_uris() {
        assert_eq!(
            parse_uri("nbd+unix:///exp?socket=/tmp/s.sock").unwrap(),
            (
                Address::Unix {
                    socket: "/tmp/s.sock".into()
                },
                "exp".to_string()
            )
        );
        assert_eq!(
            parse_uri("nbd+unix://?socket=/tmp/s").unwrap(),
            (
                Address::Unix {
                    socket: "/tmp/s".into()
                },
                String::new()
            )
        );
        assert_eq!(
            parse_uri("nbd://localhost/disk%20a").unwrap(),
            (
                Address::Tcp {
                    host: "localhost".into(),
                    port: 10809
                },
                "disk a".to_string()
            )
        );
        assert_eq!(
            parse_uri("nbd://[::1]:1234/").unwrap(),
            (
                Address::Tcp {
                    host: "::1".into(),
                    port: 1234
                },
                String::new()
            )
        );
        assert!(parse_uri("nbd+unix:///x").is_err());
        assert!(parse_uri("nbd://:99/x").is_err());
        assert!(parse_uri("nbd://h:notaport/x").is_err());
        assert!(parse_uri("http://h/x").is_err());
    }

    #[test]
    fn formatted_uris_parse_back() {
        for (address, export) in [
            (
                Address::Unix {
                    socket: "/tmp/a b/s?.sock".into(),
                },
                "",
            ),
            (
                Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10809,
                },
                "disk 1&2",
            ),
            (
                Address::Tcp {
                    host: "::1".into(),
                    port: 5,
                },
                "x/y",
            ),
        ] {
            let uri = format_uri(&address, export);
            assert_eq!(
                parse_uri(&uri).unwrap(),
                (address, export.to_string()),
                "{uri}"
            );
        }
        assert_eq!(
            format_uri(
                &Address::Unix {
                    socket: "/tmp/s".into()
                },
                ""
            ),
            "nbd+unix:///?socket=/tmp/s"
        );
    }
}
