//! The NBD protocol, as both ends speak it: the wire format ([`wire`]:
//! magics, flags, option, command and reply numbers, and the headers), the
//! socket ([`stream`]) and the URI syntax ([`uri`]). The client
//! (`driver::nbd`) and the server (`serve`) share this module, as nbdkit and
//! libnbd each keep one protocol header; it sits with storage, below both.

pub mod stream;
pub mod uri;
pub mod wire;

pub use stream::Stream;
pub use uri::{format_uri, is_uri, parse_uri, Address};
