//! A batch keeps the pairs it has open within the open-file limit by counting
//! the descriptors each image holds (`batch::descriptors::held_by_image`).
//! That count must be the truth: for every kind of image qemu-img makes (a
//! backing chain, a data file, vmdk extents), the descriptors the process
//! gains when the image opens. One test in its own binary, so no other test
//! opens files meanwhile.

use blkverify_rs::batch::descriptors::held_by_image;
use blkverify_rs::driver::{self, OpenOptions};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_now() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn every_kind_of_image_holds_the_descriptors_the_batch_counts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let create = |args: &[&str]| qemu_img(d, args);
    create(&["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    create(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    create(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ]);
    create(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    create(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=data.bin",
        "external.qcow2",
        "1M",
    ]);
    create(&["create", "-q", "-f", "vmdk", "mono.vmdk", "1M"]);
    create(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        "split.vmdk",
        "5G",
    ]);
    create(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "flat.vmdk",
        "1M",
    ]);
    create(&["create", "-q", "-f", "vhdx", "disk.vhdx", "1M"]);
    create(&["create", "-q", "-f", "vpc", "disk.vhd", "1M"]);
    create(&["create", "-q", "-f", "vdi", "disk.vdi", "1M"]);
    // (image, the files it opens: two descriptors a file, the file and its
    // lock's duplicate)
    let cases = [
        ("disk.raw", 1),
        ("base.qcow2", 1),
        ("top.qcow2", 3),
        ("external.qcow2", 2),
        ("mono.vmdk", 1),
        ("split.vmdk", 4), // the descriptor and three 2 GiB extents
        ("flat.vmdk", 2),
        ("disk.vhdx", 1),
        ("disk.vhd", 1),
        ("disk.vdi", 1),
    ];
    let mut expected: Vec<(String, usize)> = cases
        .iter()
        .map(|(name, files)| (d.join(name).display().to_string(), 2 * files))
        .collect();
    // An NBD export: its socket, and the reader's and the writer's duplicates.
    let socket = d.join("nbd.sock");
    let _server = Server(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(&socket)
            .arg(d.join("disk.raw"))
            .spawn()
            .expect("qemu-nbd runs"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    expected.push((format!("nbd+unix:///?socket={}", socket.display()), 3));
    for (name, descriptors) in expected {
        let before = open_now();
        let image = driver::open(Path::new(&name), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let held = open_now() - before;
        assert_eq!(held_by_image(image.as_ref()), held, "{name}");
        assert_eq!(held, descriptors, "{name}");
        drop(image);
        assert_eq!(open_now(), before, "{name}: closed with the image");
    }
}

/// qemu-nbd, stopped by PID when the test ends, passed or failed.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
