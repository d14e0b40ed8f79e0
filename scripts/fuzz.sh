#!/bin/sh
# Fuzz the qcow2 parsers and the block digests file's for a bounded time each (not run in CI).
#   sh scripts/fuzz.sh [SECONDS_PER_TARGET]   (TARGETS="a b" to pick targets)
# Seeds are real images made by qemu-img; crashes land in fuzz/artifacts/<target>/.
# Copy each crashing input into fuzz/regressions/<target>/ once fixed: `cargo
# test` replays every file there (tests/fuzz_regressions.rs).
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
seeds=fuzz/corpus/read_image
mkdir -p "$seeds" fuzz/corpus/header fuzz/corpus/l2_entry fuzz/corpus/write_image fuzz/corpus/digests_file
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
# The regression inputs are seeds too (README.md files aside).
for target in header l2_entry read_image write_image digests_file; do
    find "fuzz/regressions/$target" -type f ! -name '*.md' -exec cp {} "fuzz/corpus/$target/" \;
done
for target in ${TARGETS:-header l2_entry read_image write_image digests_file}; do
    echo "== $target: ${seconds}s"
    RUSTC_BOOTSTRAP=1 nice cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 2>&1 | grep -E "^(#[0-9]+.*DONE|Done|==|SUMMARY|artifact)" || true
done
