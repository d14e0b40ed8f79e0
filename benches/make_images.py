"""Build the benchmark images with QEMU's tools (they are large: never commit them).

    python benches/make_images.py DIR [--scale MIB]

``--scale`` is the size of the data sets in MiB: the issue's table uses 1024 (the
fully allocated pair is twice that). The images, by case:

- ``full.raw`` / ``full.qcow2``: 2 x scale of random data, fully allocated qcow2
  with 64 KiB clusters.
- ``mixed.raw`` / ``mixed-zlib.qcow2`` / ``mixed-zstd.qcow2``: scale of OS-like
  data (the files under /usr, in sorted order: binaries, libraries, text,
  already-compressed docs), compressed by ``qemu-img convert -c``.
- ``sparse.raw`` / ``sparse.qcow2``: 1 TiB virtual (scale x 1024 when small), with
  scale of random data in 64 runs spread evenly over the disk; the raw file is
  sparse (holes found with SEEK_DATA), the qcow2 allocates only the runs.
- ``full.vmdk``: ``full.raw`` as a monolithicSparse vmdk (every grain allocated).
- ``mixed2.raw`` / ``mixed2-stream.vmdk``: 2 x scale of OS-like data as a
  streamOptimized vmdk (an OVA's disk: every grain zlib-compressed).
- ``full-copy.qcow2``: a second fully allocated qcow2 of ``full.raw`` (qcow2 against
  qcow2).

Each image is built once; an existing image of the right size is kept.
The conftest of benches/ builds tiny ones the same way for the CI smoke run.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
SPARSE_RUNS = 64


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, stdout=subprocess.DEVNULL)


def _random_file(path: Path, mib: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MiB))


def _os_like_bytes(total: int):
    """Yield the files under /usr in a fixed order, up to ``total`` bytes."""
    left = total
    while left > 0:
        produced = 0
        for root, dirs, files in os.walk("/usr"):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        data = f.read(min(left, 64 * MiB))
                except OSError:
                    continue
                if not data:
                    continue
                yield data
                produced += len(data)
                left -= len(data)
                if left <= 0:
                    return
        if produced == 0:  # no readable /usr: fall back to text
            yield (b"line of a config file: key=value\n" * (left // 33 + 1))[:left]
            return


def _done(path: Path, size: int) -> bool:
    return path.exists() and path.stat().st_size >= size


def full_pair(directory: Path, mib: int) -> tuple[Path, Path]:
    raw, qcow2 = directory / "full.raw", directory / "full.qcow2"
    if not _done(raw, mib * MiB) or not qcow2.exists():
        _random_file(raw, mib, seed=1)
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return raw, qcow2


def vhdx_pair(directory: Path, mib: int) -> tuple[Path, Path]:
    """The fully allocated data of :func:`full_pair` as a dynamic vhdx (every block
    fully present, stored back to back)."""
    raw, _ = full_pair(directory, mib)
    vhdx = directory / "full.vhdx"
    if not vhdx.exists() or vhdx.stat().st_mtime < raw.stat().st_mtime:
        sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", str(raw), str(vhdx))
    return raw, vhdx


def mixed_pair(directory: Path, mib: int, ctype: str) -> tuple[Path, Path]:
    raw, qcow2 = directory / "mixed.raw", directory / f"mixed-{ctype}.qcow2"
    if not _done(raw, mib * MiB):
        with open(raw, "wb") as f:
            for data in _os_like_bytes(mib * MiB):
                f.write(data)
    if not qcow2.exists() or qcow2.stat().st_mtime < raw.stat().st_mtime:
        sh(
            "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
            "-o", f"compression_type={ctype}", str(raw), str(qcow2),
        )  # fmt: skip
    return raw, qcow2


def sparse_pair(directory: Path, mib: int) -> tuple[Path, Path]:
    """``mib`` MiB of data in 64 runs over a disk 1024 times larger (at most 1 TiB)."""
    raw, qcow2 = directory / "sparse.raw", directory / "sparse.qcow2"
    virtual = min(mib * 1024, 1 << 20) * MiB
    if raw.exists() and raw.stat().st_size == virtual and qcow2.exists():
        return raw, qcow2
    run_len = max(mib * MiB // SPARSE_RUNS, 64 * 1024)
    stride = virtual // SPARSE_RUNS
    rng = random.Random(3)
    raw.unlink(missing_ok=True)
    with open(raw, "wb") as f:
        f.truncate(virtual)
        for i in range(SPARSE_RUNS):
            f.seek(i * stride + stride // 3)
            left = run_len
            while left:
                n = min(left, 8 * MiB)
                f.write(rng.randbytes(n))
                left -= n
    # qemu-img convert finds the holes with SEEK_DATA and allocates only the runs.
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return raw, qcow2


def vmdk_sparse_pair(directory: Path, mib: int) -> tuple[Path, Path]:
    """The fully allocated raw disk and a monolithicSparse vmdk of it."""
    raw, _ = full_pair(directory, mib)
    vmdk = directory / "full.vmdk"
    if not vmdk.exists() or vmdk.stat().st_mtime < raw.stat().st_mtime:
        sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk))
    return raw, vmdk


def vmdk_stream_pair(directory: Path, mib: int) -> tuple[Path, Path]:
    """``mib`` MiB of OS-like data and a streamOptimized vmdk of it."""
    raw, vmdk = directory / "mixed2.raw", directory / "mixed2-stream.vmdk"
    if not _done(raw, mib * MiB):
        with open(raw, "wb") as f:
            for data in _os_like_bytes(mib * MiB):
                f.write(data)
    if not vmdk.exists() or vmdk.stat().st_mtime < raw.stat().st_mtime:
        sh(
            "qemu-img", "convert", "-f", "raw", "-O", "vmdk",
            "-o", "subformat=streamOptimized", str(raw), str(vmdk),
        )  # fmt: skip
    return raw, vmdk


def qcow2_qcow2_pair(directory: Path, mib: int) -> tuple[Path, Path]:
    """Two fully allocated qcow2 images of the same disk, laid out differently
    (the copy is written by a second ``convert``, with 128 KiB clusters)."""
    raw, qcow2 = full_pair(directory, mib)
    copy = directory / "full-copy.qcow2"
    if not copy.exists() or copy.stat().st_mtime < raw.stat().st_mtime:
        sh(
            "qemu-img", "convert", "-f", "raw", "-O", "qcow2",
            "-o", "cluster_size=128k", str(raw), str(copy),
        )  # fmt: skip
    return qcow2, copy


# VHD (QEMU's "vpc") and VDI copies of the allocated disk: name -> (format, options).
VPC_VDI = {
    "vpc-dynamic": ("vpc", "subformat=dynamic,force_size=on"),
    "vpc-fixed": ("vpc", "subformat=fixed,force_size=on"),
    "vdi": ("vdi", "static=off"),
}


def vpc_vdi_pairs(directory: Path, mib: int) -> dict[str, tuple[Path, Path]]:
    """The fully allocated raw disk and its copy in each of ``VPC_VDI``'s formats
    (named ``full-CASE.FORMAT``, so the suffix names the format)."""
    raw, _ = full_pair(directory, mib)
    out = {}
    for case, (fmt, opts) in VPC_VDI.items():
        image = directory / f"full-{case}.{fmt}"
        if not image.exists() or image.stat().st_mtime < raw.stat().st_mtime:
            sh("qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", opts, str(raw), str(image))
        out[case] = (raw, image)
    return out


def build_all(directory: Path, mib: int) -> dict[str, tuple[Path, Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "allocated": full_pair(directory, 2 * mib),
        "vhdx": vhdx_pair(directory, 2 * mib),
        "zlib": mixed_pair(directory, mib, "zlib"),
        "zstd": mixed_pair(directory, mib, "zstd"),
        "sparse": sparse_pair(directory, mib),
        "vmdk-sparse": vmdk_sparse_pair(directory, 2 * mib),
        "vmdk-stream": vmdk_stream_pair(directory, 2 * mib),
        "qcow2-qcow2": qcow2_qcow2_pair(directory, 2 * mib),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--scale", type=int, default=1024, help="data size in MiB")
    args = parser.parse_args(argv)
    for case, (raw, test) in build_all(args.directory, args.scale).items():
        print(f"{case}: {raw} {test}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
