#!/bin/sh
# Build what `pip install blkverify-rs` needs, into dist/ (or OUT):
#   - blkverify_rs-V-cp311-abi3-manylinux_2_17_x86_64.whl: one extension on the
#     stable ABI (Cargo feature `abi3`), for every CPython from 3.11 on;
#   - blkverify_rs-V-cp310-cp310-manylinux_2_17_x86_64.whl, for CPython 3.10;
#   - blkverify_rs-V.tar.gz, the sdist (builds with `pip install` where Rust is).
# Both wheels are release builds with a stripped extension, linked by zig
# against glibc 2.17's symbols (the manylinux2014 policy), so no docker is
# needed; `auditwheel show` then says which policy each one meets.
#
#   sh scripts/build-wheels.sh [OUT]     (default dist/; its old blkverify_rs-* files are removed)
#
# Needs Rust, and CPython 3.11 or later: python3 if it is >= 3.11, else
# python3.11; and CPython 3.10 if there is one (python3.10, pyenv's; else
# maturin's bundled sysconfig of 3.10). PYTHON310 and PYTHON311 override. The build tools (scripts/wheel-tools.txt: maturin, ziglang,
# auditwheel) are installed into python3's environment.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$here/dist}")
cd "$here"

# The first interpreter of CPython $1 that runs: $2 (an override), python$1,
# then pyenv's $1.x.
find_python() {
    for cand in "$2" "python$1" "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/$1".*/bin/"python$1"; do
        [ -n "$cand" ] || continue
        if "$cand" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$1'.split('.')))" 2>/dev/null; then
            "$cand" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    echo "build-wheels.sh: no CPython $1 found (set PYTHON$(echo "$1" | tr -d .) to one)" >&2
    return 1
}
if python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    py_abi3=${PYTHON311:-$(python3 -c 'import sys; print(sys.executable)')}
else
    py_abi3=$(find_python 3.11 "${PYTHON311:-}")
fi
# Without a CPython 3.10 here, maturin builds the cp310 wheel from the sysconfig
# it bundles for CPython 3.10 on Linux (the extension links no libpython).
py310=$(find_python 3.10 "${PYTHON310:-}" 2>/dev/null) || py310=python3.10

python3 -m pip install --quiet --disable-pip-version-check -r scripts/wheel-tools.txt
# maturin finds zig as `python3 -m ziglang`; name the python3 that has it (a
# pyenv shim puts its own interpreter first on maturin's PATH).
CARGO_ZIGBUILD_PYTHON_PATH=$(python3 -c 'import sys; print(sys.executable)')
export CARGO_ZIGBUILD_PYTHON_PATH

mkdir -p "$out"
rm -f "$out"/blkverify_rs-*
build="maturin build --release --zig --compatibility manylinux2014 --out $out"
echo "== abi3 wheel (CPython >= 3.11, built with $py_abi3)"
nice -n 10 $build --features abi3 --interpreter "$py_abi3"
echo "== cp310 wheel (built with $py310)"
nice -n 10 $build --interpreter "$py310"
echo "== sdist"
maturin sdist --out "$out"
ls -l "$out"/blkverify_rs-*
