#!/bin/sh
# The whole test suite: Rust unit tests, then the pytest suite against the
# installed package (QEMU's tools are the oracle). Run from the repo root after
# `pip install .`; it installs the test-only Python packages it needs (Dask's
# distributed too: the cluster tests start a real scheduler and workers, and
# must run, not skip). tests/test_wheels.py builds the wheels and the sdist once
# (scripts/build-wheels.sh: two more release builds) and installs them into
# fresh venvs of every CPython from 3.10 to 3.13 that pyenv has.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check 'pytest>=8' 'pytest-benchmark>=4' \
    'blake3>=1' 'distributed>=2024.1'
cargo test --release --quiet
# Two runs: tests/ and benches/ each have a conftest.py that their modules
# import helpers from, and one pytest process can hold only one "conftest".
python3 -m pytest -q benches
python3 -m pytest -q tests
