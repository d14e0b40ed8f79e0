//! Decompressing one qcow2 cluster: raw deflate or a zstd frame.
//!
//! libdeflate decodes a whole buffer at once and is the fastest deflate decoder
//! we know of; QEMU's streams are single, complete deflate streams, so its
//! buffer-at-once interface fits. Decoders are per thread, so parallel verify
//! never contends on them.

use super::header::CompressionType;
use std::cell::RefCell;

thread_local! {
    static DEFLATE: RefCell<libdeflater::Decompressor> = RefCell::new(libdeflater::Decompressor::new());
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Decompress `input` (which may carry trailing padding) into exactly `output`.
/// The error says what was wrong with the stream.
pub fn decompress(kind: CompressionType, input: &[u8], output: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => DEFLATE.with(|d| {
            let mut d = d.borrow_mut();
            match d.deflate_decompress(input, output) {
                Ok(n) if n == output.len() => Ok(()),
                Ok(n) => Err(format!(
                    "deflate stream holds {n} bytes, not a whole cluster ({})",
                    output.len()
                )),
                Err(e) => Err(format!("deflate stream is invalid ({e})")),
            }
        }),
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let dctx = slot.get_or_insert_with(zstd::zstd_safe::DCtx::create);
            dctx.reset(zstd::zstd_safe::ResetDirective::SessionOnly)
                .map_err(|code| format!("zstd reset failed ({code})"))?;
            let mut inbuf = zstd::zstd_safe::InBuffer::around(input);
            let out_len = output.len();
            let mut outbuf = zstd::zstd_safe::OutBuffer::around(output);
            let mut remaining_hint = 1usize;
            while outbuf.pos() < out_len {
                let (in_before, out_before) = (inbuf.pos(), outbuf.pos());
                remaining_hint =
                    dctx.decompress_stream(&mut outbuf, &mut inbuf)
                        .map_err(|code| {
                            format!(
                                "zstd stream is invalid ({})",
                                zstd::zstd_safe::get_error_name(code)
                            )
                        })?;
                if remaining_hint == 0 && outbuf.pos() < out_len {
                    return Err(format!(
                        "zstd frame holds {} bytes, not a whole cluster ({out_len})",
                        outbuf.pos()
                    ));
                }
                if inbuf.pos() == in_before && outbuf.pos() == out_before {
                    return Err("zstd stream is truncated".to_string());
                }
            }
            if remaining_hint != 0 {
                // The output is full, but the frame is not finished: it would
                // decompress to more than a cluster.
                let mut probe = [0u8; 1];
                let mut probe_buf = zstd::zstd_safe::OutBuffer::around(&mut probe[..]);
                let hint = dctx
                    .decompress_stream(&mut probe_buf, &mut inbuf)
                    .map_err(|code| {
                        format!(
                            "zstd stream is invalid ({})",
                            zstd::zstd_safe::get_error_name(code)
                        )
                    })?;
                if probe_buf.pos() > 0 || hint != 0 {
                    return Err(format!(
                        "zstd frame holds more than a cluster ({out_len} bytes)"
                    ));
                }
            }
            Ok(())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_round_trip_with_trailing_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let mut packed = zstd::bulk::compress(&data, 3).unwrap();
        packed.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; 65536 * 2];
        assert!(decompress(CompressionType::Zstd, &packed, &mut short).is_err());
        let mut small = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zstd, &packed, &mut small).is_err());
        assert!(decompress(CompressionType::Zstd, &packed[..100], &mut out).is_err());
    }

    #[test]
    fn deflate_round_trip_with_trailing_padding() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut packed = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(&data, &mut packed).unwrap();
        packed.truncate(n);
        packed.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Deflate, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());
    }
}
