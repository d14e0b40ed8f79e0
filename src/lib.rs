//! blkverify-rs: prove that a block driver returns the right bytes.
//!
//! The core, in layers whose arrows point down (docs/layout.md draws them;
//! tests/test_layers.py checks them), from the bottom:
//!
//! - [`error`], [`size`] (the size grammar and the sector), [`compare`], and
//!   big-endian fields;
//! - [`storage`]: how bytes are read and written (files, memory, mapped views),
//!   and [`nbd`], the NBD protocol's wire format that the client and the
//!   server share;
//! - [`driver`]: the block-driver trait, the probe, and one folder per format
//!   (raw, qcow2, vmdk, vhdx, vpc, vdi, and the NBD client), with what the
//!   formats share at driver level;
//! - [`pool`] and [`report`]: the worker pool and the report types the engines
//!   share;
//! - the whole-image engines: [`verify`](mod@verify), [`digest`] (image digests and block
//!   digests files) and [`map`] (the allocation map);
//! - [`batch`]: many pairs at once, each checked by verify or digest;
//! - [`blkverify`]: the mirrored device;
//! - [`record`]: the op log and the trace, what runs leave for replays;
//! - [`serve`]: the device as an NBD server (which records traces);
//! - [`exercise`]: the seeded workload run through the device, and the
//!   replay of a record (an op log, or a trace with serve's meaning).
//!
//! Nothing here knows Python; the bindings live in `python` behind the `python`
//! feature.

pub mod batch;
pub mod blkverify;
pub(crate) mod bytes;
pub mod compare;
pub mod digest;
pub mod driver;
pub mod error;
pub mod exercise;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod map;
pub mod nbd;
pub mod pool;
pub mod record;
pub mod report;
pub mod serve;
pub mod size;
pub mod storage;
pub mod verify;

#[cfg(feature = "python")]
mod python;

pub use blkverify::{open_spec, Blkverify, Opened};
pub use driver::{open, BlockDriver, Extent, Format, Location, Mapping, OpenOptions};
pub use error::{Error, Result};
pub use report::{Mismatch, Report, VerifyOptions};
pub use verify::verify;
