#!/bin/sh
# Draw docs/map.md's picture of `blkverify verify --html`: a qcow2 over a qcow2
# backing file, with data, zero and compressed clusters, made with QEMU's own
# tools; its raw reference gets writes the qcow2 never saw (lost writes), and
# one byte of the qcow2's data is flipped. verify finds the runs and draws the
# page; headless Chromium screenshots it with finding 3 selected.
#
#   sh scripts/map_screenshot.sh [OUT.png]      (default docs/map.png)
#
# Needs blkverify installed (pip install .), qemu-img, qemu-io and chromium.
set -eu
cd "$(dirname "$0")/.."
out=${1:-docs/map.png}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

qemu-img create -q -f qcow2 "$dir/base.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 24M' -c 'write -P 0x12 40M 8M' "$dir/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$dir/top.qcow2"
qemu-io -f qcow2 -c 'write -P 0x22 4M 6M' -c 'write -z 12M 4M' -c 'write -c -P 0x33 28M 4M' \
    -c 'write -P 0x44 50M 3M' -c 'write -P 0x45 60M 1M' "$dir/top.qcow2" >/dev/null
qemu-img convert -O raw "$dir/top.qcow2" "$dir/raw.img"

# Writes that reached the reference only: in the qcow2's own data, in a zero
# run, in the compressed run and in ranges the backing file serves.
qemu-io -f raw -c 'write -P 0x99 5M 64k' -c 'write -P 0x9a 13M 4k' -c 'write -P 0x9b 29M 12k' \
    -c 'write -P 0x9c 18M 128k' -c 'write -P 0x9d 42M 4k' "$dir/raw.img" >/dev/null
# And one byte of the qcow2's data flipped in place.
python3 - "$dir/top.qcow2" <<'PY'
import json, subprocess, sys
path = sys.argv[1]
extents = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", path]))
guest = (51 << 20) + 0x1234
e = next(e for e in extents if e["depth"] == 0 and e["data"] and e["start"] <= guest < e["start"] + e["length"])
with open(path, "r+b") as f:
    f.seek(e["offset"] + guest - e["start"])
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
PY

status=0
(cd "$dir" && python3 -m blkverify_rs verify -q --html page.html raw.img top.qcow2) || status=$?
test "$status" -eq 1

mkdir -p "$(dirname "$out")"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-color-profile=srgb \
    --user-data-dir="$dir/profile" --window-size=1300,1000 --screenshot="$(realpath "$out")" \
    "file://$dir/page.html#finding-3" >/dev/null 2>&1
echo "wrote $out ($(wc -c <"$out") bytes)"
