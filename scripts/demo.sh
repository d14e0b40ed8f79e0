#!/bin/sh
# Make a raw reference and a compressed qcow2 copy with QEMU's own tools, verify
# them (identical), then corrupt one byte of the qcow2's data and verify again:
# blkverify names the corrupt sector and where the qcow2 metadata put it.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
qemu-img create -f qcow2 "$dir/test.qcow2" 64M >/dev/null
qemu-io -c 'write -P 0xcd 0 1M' -c 'write -P 0x5a 5M 300k' -c 'write -z 8M 1M' \
    "$dir/test.qcow2" >/dev/null
qemu-img convert -O raw "$dir/test.qcow2" "$dir/raw.img"
echo "\$ blkverify verify raw.img test.qcow2"
blkverify verify "$dir/raw.img" "$dir/test.qcow2"
# Flip one byte 0x1234 bytes into the guest's 6th MiB (inside the 0x5a run).
python3 - "$dir/test.qcow2" <<'PY'
import json, subprocess, sys
path = sys.argv[1]
extents = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", path]))
guest = (5 << 20) + 0x1234
e = next(e for e in extents if e["data"] and e["start"] <= guest < e["start"] + e["length"])
with open(path, "r+b") as f:
    f.seek(e["offset"] + guest - e["start"])
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
PY
echo "\$ blkverify verify raw.img test.qcow2   # after flipping the byte at guest offset 0x501234"
status=0
blkverify verify "$dir/raw.img" "$dir/test.qcow2" || status=$?
echo "exit status $status (1: the images differ)"
test "$status" -eq 1
