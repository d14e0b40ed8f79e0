#!/bin/sh
# Build the real blksum (blkhash 0.11) into DIR, once, and print its path: the
# oracle of `blkverify digest` in tests/test_digest.py and its yardstick in
# benches/. The source and the build script are the team's, in shared/tools
# beside this checkout (or beside the folder of worktrees that holds it).
#   usage: scripts/build-blksum.sh DIR   (needs meson ninja-build pkg-config libssl-dev libnbd-dev)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
for tools in "$here/../shared/tools" "$here/../../shared/tools"; do
    if [ -f "$tools/build-blksum.sh" ]; then
        exec sh "$tools/build-blksum.sh" "$@"
    fi
done
echo "build-blksum.sh: shared/tools/build-blksum.sh not found beside $here" >&2
exit 2
