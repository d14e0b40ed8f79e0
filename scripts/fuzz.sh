#!/bin/sh
# Fuzz the image parsers (qcow2, vmdk, vhdx, vpc, vdi), the block digests file's, the
# serve trace's, the NBD server (whole client connections) and our NBD client (whole
# server transcripts, and reply streams) for a bounded time each (not run in CI).
#   sh scripts/fuzz.sh [SECONDS_PER_TARGET]   (TARGETS="a b" to pick targets)
# Seeds are real images made by qemu-img; crashes land in fuzz/artifacts/<target>/.
# Copy each crashing input into fuzz/regressions/<target>/ once fixed: `cargo
# test` replays every file there (tests/fuzz_regressions.rs).
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
seeds=fuzz/corpus/read_image
mkdir -p "$seeds" fuzz/corpus/header fuzz/corpus/l2_entry fuzz/corpus/write_image fuzz/corpus/read_vmdk fuzz/corpus/digests_file fuzz/corpus/trace_file
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
for opts in "cluster_size=512" "cluster_size=4k" "compat=0.10" "extended_l2=on" \
    "compression_type=zstd" "refcount_bits=1" "lazy_refcounts=on"; do
    i=$((i + 1))
    qemu-img create -q -f qcow2 -o "$opts" "$tmp/$i.qcow2" 1M
    qemu-io -c 'write -P 0xab 0 4k' -c 'write -z 64k 4k' -c 'write -c 128k 64k' \
        "$tmp/$i.qcow2" >/dev/null 2>&1 || qemu-io -c 'write -P 0xab 0 4k' "$tmp/$i.qcow2" >/dev/null
    cp "$tmp/$i.qcow2" "$seeds/seed-$i"
    head -c 4096 "$tmp/$i.qcow2" >"fuzz/corpus/header/seed-$i"
    # write_image: a count byte (3 ops), three 8-byte ops, then the image.
    { printf '\003\000\000\000\000\000\000\200\000\001\000\000\001\000\020\000\000\003\000\000\000\200\000\010\000'
      cat "$tmp/$i.qcow2"; } >"fuzz/corpus/write_image/seed-$i"
done
qemu-img snapshot -c s1 "$tmp/1.qcow2" && cp "$tmp/1.qcow2" "$seeds/seed-snapshot"
# A dirty image (lazy refcounts, killed mid-run): a writable open rebuilds its refcounts.
qemu-io -c 'write -P 0x5a 0 64k' -c abort "$tmp/7.qcow2" >/dev/null 2>&1 || true
{ printf '\001\000\000\000\000\020\000\200\000'; cat "$tmp/7.qcow2"; } >fuzz/corpus/write_image/seed-dirty
# read_vmdk: small disks of every kind qemu-img makes that fit in one file (a
# sparse extent, stream-optimized, zeroed grains, a differencing child), and
# the descriptor files of the others (their extents do not exist under the
# fuzz name, so those seeds exercise the descriptor parser).
vm=fuzz/corpus/read_vmdk
qemu-img create -q -f raw "$tmp/src.raw" 1M
qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'write -P 0x11 512k 4k' "$tmp/src.raw" >/dev/null
for sub in monolithicSparse streamOptimized monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat; do
    qemu-img convert -f raw -O vmdk -o "subformat=$sub" "$tmp/src.raw" "$tmp/$sub.vmdk"
    cp "$tmp/$sub.vmdk" "$vm/seed-$sub"
done
qemu-img create -q -f vmdk -o zeroed_grain=on "$tmp/zg.vmdk" 1M
qemu-io -f vmdk -c 'write -z 0 128k' -c 'write -P 0x22 192k 64k' "$tmp/zg.vmdk" >/dev/null
cp "$tmp/zg.vmdk" "$vm/seed-zeroed-grain"
(cd "$tmp" && qemu-img create -q -f vmdk -b monolithicSparse.vmdk -F vmdk child.vmdk &&
    qemu-io -f vmdk -c 'write -P 0x33 0 4k' child.vmdk >/dev/null)
cp "$tmp/child.vmdk" "$vm/seed-child"
# vhdx: small qemu-img images of each kind, and spec-built ones qemu-img cannot make
# (a dirty log, a differencing disk, 4096-byte sectors) from the tests' builder.
mkdir -p fuzz/corpus/read_vhdx
for opts in "subformat=dynamic" "subformat=fixed" "block_size=2M,log_size=2M"; do
    i=$((i + 1))
    qemu-img create -q -f vhdx -o "$opts" "$tmp/$i.vhdx" 3M
    qemu-io -f vhdx -c 'write -P 0xab 0 4k' -c 'write -P 0x11 2M 1M' "$tmp/$i.vhdx" >/dev/null
    cp "$tmp/$i.vhdx" "fuzz/corpus/read_vhdx/seed-$i"
done
PYTHONPATH=tests python3 - fuzz/corpus/read_vhdx <<'EOF'
import sys

import vhdx_builder as vb

out = sys.argv[1]
d = vb.Disk(size=3 * vb.MiB, sector_size=4096, log_guid=bytes(range(1, 17)))
d.blocks = {0: vb.Block(vb.FULLY_PRESENT, vb.pattern(1, vb.MiB)), 1: vb.Block(vb.ZERO)}
lay = d.build(f"{out}/seed-dirty")
page = lay["true_bytes"][lay["bat_offset"] : lay["bat_offset"] + 4096]
e = vb.LogEntry(0, 3, 0, writes={lay["bat_offset"]: page}, zeros=[(5 << 20, 4096)])
d.build(f"{out}/seed-dirty", [e], stale_pages={lay["bat_offset"]: bytes(4096)})
link = {"parent_linkage": "{" + "0" * 8 + "-0000-0000-0000-" + "0" * 12 + "}"}
c = vb.Disk(size=3 * vb.MiB, parent={**link, "relative_path": "p.vhdx"})
c.blocks = {1: vb.Block(vb.PARTIALLY_PRESENT, vb.pattern(2, vb.MiB), frozenset({0, 5, 6}))}
c.build(f"{out}/seed-diff")
EOF
# VHD and VDI seeds: every subformat qemu-img makes, with data in a block, and
# (from tests/vhd_builder.py, as qemu-img cannot make them) VHDs with small blocks,
# partly set sector bitmaps and parent locators. Their blocks are large, so these
# two targets take inputs of up to 4 MiB.
mkdir -p fuzz/corpus/vpc_image fuzz/corpus/vdi_image
for opts in "subformat=dynamic" "subformat=dynamic,force_size=on" "subformat=fixed"; do
    i=$((i + 1))
    qemu-img create -q -f vpc -o "$opts" "$tmp/$i.vhd" 1M
    qemu-io -f vpc -c 'write -P 0xab 4k 4k' "$tmp/$i.vhd" >/dev/null
    cp "$tmp/$i.vhd" "fuzz/corpus/vpc_image/seed-$i"
done
for opts in "static=off" "static=on"; do
    i=$((i + 1))
    qemu-img create -q -f vdi -o "$opts" "$tmp/$i.vdi" 2M
    qemu-io -f vdi -c 'write -P 0xab 1M 4k' "$tmp/$i.vdi" >/dev/null
    cp "$tmp/$i.vdi" "fuzz/corpus/vdi_image/seed-$i"
done
PYTHONPATH=tests python3 - fuzz/corpus/vpc_image <<'PY'
import sys
import vhd_builder as vb

out = sys.argv[1]
bs = 4096
data = bytes(range(256)) * (bs // 256)
blocks = {0: vb.Block(set(range(8)), data), 2: vb.Block({0, 3, 7}, data)}
vb.Vhd(size=64 * 1024, block_size=bs, blocks=blocks).write(f"{out}/seed-partial")
locators = [
    vb.Locator(b"W2ru", vb.w2(".\\parent.vhd")),
    vb.Locator(b"W2ku", vb.w2("C:\\vms\\parent.vhd")),
    vb.Locator(b"MacX", b"file://localhost/vms/parent%20disk.vhd"),
    vb.Locator(b"Mac ", bytes(64)),
]
vb.Vhd(
    size=64 * 1024, block_size=bs, disk_type=vb.DIFFERENCING, parent_name="parent.vhd",
    locators=locators, blocks=blocks,
).write(f"{out}/seed-differencing")
PY
# The NBD targets' seeds are the recorded sessions in fuzz/regressions (real clients
# talking to serve, real servers answering our client: `cargo run --release --example
# record_nbd_seeds`). The regression inputs are seeds too (README.md files aside).
all="header l2_entry read_image write_image read_vmdk read_vhdx vpc_image vdi_image digests_file"
all="$all trace_file serve_connection nbd_handshake nbd_replies"
for target in $all; do
    mkdir -p "fuzz/corpus/$target"
    find "fuzz/regressions/$target" -type f ! -name '*.md' -exec cp {} "fuzz/corpus/$target/" \;
done
for target in ${TARGETS:-$all}; do
    echo "== $target: ${seconds}s"
    case $target in vpc_image | vdi_image) more="-max_len=4194304" ;; *) more="" ;; esac
    # shellcheck disable=SC2086
    RUSTC_BOOTSTRAP=1 nice cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 $more 2>&1 | grep -E "^(#[0-9]+.*DONE|Done|==|SUMMARY|artifact)" || true
done
