//! Reads of VMDK disks that qemu-img made, against `qemu-img convert -O raw`.
//! (The Python suite covers every subformat, damage and policy; these keep the
//! driver honest under `cargo test` alone.)

use crate::driver::{self, BlockDriver, Format, OpenOptions};
use std::path::Path;
use std::process::Command;

fn run(args: &[&str], dir: &Path) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// A 3 MiB guest with data, a hole and a tail that is not grain-aligned.
fn make_raw(dir: &Path) {
    let mut bytes = vec![0u8; (3 << 20) - 4096];
    for (i, b) in bytes.iter_mut().enumerate().take(1 << 20) {
        *b = (i / 511) as u8 ^ (i as u8);
    }
    bytes[(2 << 20) + 77..(2 << 20) + 5000].fill(0x5a);
    std::fs::write(dir.join("src.raw"), bytes).unwrap();
}

fn read_all(image: &dyn BlockDriver) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn every_subformat_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_raw(d);
    run(
        &[
            "qemu-img", "convert", "-f", "raw", "-O", "raw", "src.raw", "want.raw",
        ],
        d,
    );
    let want = std::fs::read(d.join("want.raw")).unwrap();
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let name = format!("{sub}.vmdk");
        let opt = format!("subformat={sub}");
        run(
            &[
                "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", &opt, "src.raw", &name,
            ],
            d,
        );
        let image = driver::open(&d.join(&name), &OpenOptions::default()).unwrap();
        assert_eq!(image.format_name(), "vmdk");
        assert_eq!(read_all(image.as_ref()), want, "{sub}");
        // Odd-sized reads across grains and, for split disks, extents.
        let mut buf = vec![0u8; 70_001];
        image.read_at(&mut buf, 65_000).unwrap();
        assert_eq!(buf, want[65_000..135_001], "{sub}");
        let location = image.locate(4096).unwrap().unwrap();
        assert_eq!(location.format, Format::Vmdk);
        assert_eq!(
            location.kind,
            if sub == "streamOptimized" {
                "compressed"
            } else {
                "data"
            }
        );
    }
}

#[test]
fn a_write_open_gives_a_read_only_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        &["qemu-img", "create", "-q", "-f", "vmdk", "a.vmdk", "1M"],
        d,
    );
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let image = driver::open(&d.join("a.vmdk"), &options).unwrap();
    assert!(image.is_read_only());
    assert!(image.write_at(b"x", 0).is_err());
}
