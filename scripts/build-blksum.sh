#!/bin/sh
# Build the real blksum (blkhash 0.11) into DIR, once, and print its path: the
# oracle of `blkverify digest` in tests/test_digest.py and its yardstick in
# benches/. The source is third_party/blkhash-0.11.0-src.tar.gz (LGPL-2.1+), so
# a clean checkout builds it without the network.
#   usage: scripts/build-blksum.sh DIR   (needs meson ninja-build pkg-config libssl-dev libnbd-dev)
set -eu
out=${1:?usage: build-blksum.sh DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$out/blkhash/build/bin/blksum" ]; then echo "$out/blkhash/build/bin/blksum"; exit 0; fi
for tool in meson ninja pkg-config; do
    command -v "$tool" >/dev/null || {
        echo "build-blksum.sh: needs $tool (apt-get install meson ninja-build pkg-config libssl-dev libnbd-dev)" >&2
        exit 2
    }
done
mkdir -p "$out"
tar -xzf "$here/third_party/blkhash-0.11.0-src.tar.gz" -C "$out"
cd "$out/blkhash"
# blkhash's own unit tests fetch a test framework from the network; blksum does not need them.
sed -i "s/^subdir('test')/# subdir('test')/" meson.build
meson setup build -Dman=disabled -Dblake3=disabled --buildtype=release >/dev/null
ninja -C build >/dev/null
echo "$out/blkhash/build/bin/blksum"
