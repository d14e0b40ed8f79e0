#!/bin/sh
# Build the blkverify test guest (issue 23) into OUTDIR:
#   OUTDIR/vmlinuz            Debian's cloud kernel (NVMe and ext4 built in), fetched with
#                             `apt-get download` and unpacked with `dpkg-deb -x`, never
#                             installed; kept if already there (OUTDIR/kernel.pkg names it)
#   OUTDIR/initramfs.cpio.gz  busybox-static, mke2fs and e2fsck with their libraries (found
#                             with ldd), scripts/guest/init as /init, and /tree: a
#                             deterministic tree of a few MiB for the guest to copy
#   OUTDIR/tree               that tree, for the host to compare with
# Usage: sh scripts/guest/build.sh OUTDIR
# Needs: apt-get, dpkg-deb, busybox-static, e2fsprogs, cpio, gzip, python3 (.ci/run
# installs them).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -- the kernel ---------------------------------------------------------------------------
if [ ! -s "$out/vmlinuz" ]; then
    # the metapackage names the real image package (linux-image-6.1.0-NN-cloud-amd64)
    find_pkg() {
        apt-cache depends linux-image-cloud-amd64 2>/dev/null \
            | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
    }
    pkg=$(find_pkg)
    if [ -z "$pkg" ]; then
        apt-get update -q >&2
        pkg=$(find_pkg)
    fi
    [ -n "$pkg" ] || { echo "build.sh: no linux-image-cloud-amd64 in apt's lists" >&2; exit 1; }
    mkdir "$work/deb"
    # apt's sandbox user cannot write to a private temporary directory: say so, quietly
    (cd "$work/deb" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2) || true
    if ! ls "$work/deb/"*.deb >/dev/null 2>&1; then
        apt-get update -q >&2
        (cd "$work/deb" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2) || true
    fi
    deb=$(ls "$work/deb/"*.deb)
    dpkg-deb -x "$deb" "$work/kernel"
    cp "$work/kernel/boot/vmlinuz-"* "$out/vmlinuz.tmp"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    echo "$pkg $(dpkg-deb -f "$deb" Version)" >"$out/kernel.pkg"
    rm -rf "$work/kernel" "$work/deb"
fi

# -- the initramfs ------------------------------------------------------------------------
root=$work/root
mkdir -p "$root/bin" "$root/sbin" "$root/etc" "$root/dev" "$root/proc" "$root/sys" \
    "$root/mnt" "$root/tmp"

# copy a program and the shared libraries ldd finds for it, at the same paths
copy_prog() {
    src=$1
    dst=$2
    cp -L "$src" "$root$dst"
    ldd "$src" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' \
        | while read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
        done
}

busybox=$(command -v busybox)
copy_prog "$busybox" /bin/busybox
for applet in sh ash cat cmp cp cut dd echo find grep ls mkdir mount mv poweroff printf \
    reboot rm sleep sync timeout umount fstrim sha256sum uname dmesg wc true false test \
    "["; do
    ln -s busybox "$root/bin/$applet"
done
copy_prog "$(command -v mke2fs)" /sbin/mke2fs
copy_prog "$(command -v e2fsck)" /sbin/e2fsck
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
cp "$here/init" "$root/init"
chmod 755 "$root/init"

# the tree: about 4 MiB, the same bytes on every build
python3 - "$root/tree" <<'EOF'
import random
import sys
from pathlib import Path

root = Path(sys.argv[1])
rng = random.Random(0xB1C5)
words = b"qcow2 cluster sector refcount backing snapshot guest block verify the of and".split()


def put(rel, data):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


put("big/blob.bin", rng.randbytes(2 * 1024 * 1024))
put("big/zeros.bin", bytes(256 * 1024))
for i in range(24):
    put(f"d1/f{i:02}.bin", rng.randbytes(rng.randrange(1, 96 * 1024)))
for i in range(8):
    text = b" ".join(rng.choice(words) for _ in range(12000)) + b"\n"
    put(f"d2/text{i}.txt", text)
put("d2/deep/er/odd.bin", rng.randbytes(12345))
put("d2/empty", b"")
EOF
# the same tree beside the initramfs, for the host to compare with what the guest wrote
rm -rf "$out/tree"
cp -a "$root/tree" "$out/tree"

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet -R 0:0) \
    | gzip -n -6 >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$out/vmlinuz $out/initramfs.cpio.gz"
