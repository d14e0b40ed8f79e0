#!/bin/sh
# Build the benchmark images (large: 2 GiB + 1 GiB + a sparse 1 TiB; never
# commit them) and print the issue's table, ours against QEMU, interleaved.
# Usage: sh scripts/bench.sh [DIR] [SCALE_MIB]   (defaults: ./bench-images 1024)
set -eu
cd "$(dirname "$0")/.."
exec python3 benches/bench_table.py "${1:-bench-images}" --scale "${2:-1024}" --rounds 5
