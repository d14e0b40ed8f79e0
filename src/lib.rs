//! blkverify-rs: prove that a block driver returns the right bytes.
//!
//! The core: image drivers ([`driver`]), the storage they read ([`storage`]),
//! the whole-image verify engine ([`verify`]), image digests ([`digest`]) and
//! the allocation map ([`map`]).
//! Nothing here knows Python; the bindings live in `python` behind the `python`
//! feature.
#![warn(missing_docs)]

pub mod blkverify;
pub mod compare;
pub mod digest;
pub mod driver;
pub mod error;
pub mod exercise;
#[doc(hidden)]
pub mod fuzzing;
pub mod map;
pub mod nbd;
pub mod serve;
pub mod size;
pub mod storage;
pub mod verify;

#[cfg(feature = "python")]
mod python;

pub use blkverify::{open_spec, Blkverify, Opened};
pub use driver::{open, BlockDriver, Extent, Format, Location, Mapping, OpenOptions};
pub use error::{Error, Result};
pub use verify::{verify, Mismatch, Report, VerifyOptions};
