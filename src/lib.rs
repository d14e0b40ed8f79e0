//! blkverify-rs: prove that a block driver returns the right bytes.
//!
//! The core, from the bottom layer up (docs/layout.md draws the layers): the
//! error type ([`error`]), QEMU's size syntax ([`size`]) and the comparison of
//! bytes ([`compare`]); the storage images are read from ([`storage`]); the
//! image drivers, one folder per format, and the NBD client ([`driver`]); the
//! whole-image engines: verify ([`verify`]), image digests ([`digest`]) and the
//! allocation map ([`map`]); the mirrored device ([`blkverify`]); and the seeded
//! workload that drives it ([`exercise`]).
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
