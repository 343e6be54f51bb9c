#!/usr/bin/env bash
# Builds the Nubis guest images from Debian packages into guest-images/out/:
#   vmlinux, bzImage        microVM kernel (linux-source-6.1 + kernel.config + patches/)
#   initramfs.cpio          busybox-static user space with rootfs/init (uncompressed:
#                           gzip decompression costs seconds under KVM's emulator)
#   initramfs.cpio.gz       the same, gzip-compressed
#   rootfs.ext4             the same tree as an ext4 root disk (mkfs.ext4 -d, no mounts)
#   run-initramfs.cpio      `nubis run`'s initramfs: rootfs/nubis-run-init as PID 1
#   rootfs-bench.ext4       rootfs.ext4's tree plus Debian's fio and iperf3 with their
#                           shared-library closure, for bench/devices.py
#   cmdline                 kernel arguments these images need
#
# Outputs are cached outside the repo, keyed by a hash of their recipe, in
# $NUBIS_IMAGE_CACHE (default /var/cache/nubis/guest-images): the kernel
# (~9 min on 2 cores) is rebuilt only when its recipe changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
cache="${NUBIS_IMAGE_CACHE:-/var/cache/nubis/guest-images}"
jobs="${NUBIS_BUILD_JOBS:-$(nproc)}"
linux_tarball=/usr/src/linux-source-6.1.tar.xz
busybox=/bin/busybox

log() { echo "guest-images: $*" >&2; }
die() { echo "guest-images: error: $*" >&2; exit 1; }

need_file() { [ -e "$1" ] || die "$1 is missing (install Debian package $2: scripts/install-deps.sh)"; }
need_file "$linux_tarball" linux-source-6.1
need_file "$busybox" busybox-static
for tool in make gcc musl-gcc strip flex bison bc cpio mkfs.ext4 debugfs patch sha256sum lz4 file ldd; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
done
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' || \
    [ "$(ldd "$busybox" 2>&1 | grep -c 'not a dynamic')" = 1 ] || \
    die "$busybox is not statically linked (install busybox-static, not busybox)"

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

# The benchmark tools for rootfs-bench.ext4 (host binaries from Debian's amd64
# packages) and their shared-library closure, dynamic loader included: one path a line.
bench_tools=(/usr/bin/fio:fio /usr/bin/iperf3:iperf3)
for entry in "${bench_tools[@]}"; do
    need_file "${entry%%:*}" "${entry#*:}"
    unresolved="$(ldd "${entry%%:*}" | grep 'not found' || true)"
    [ -z "$unresolved" ] || die "${entry%%:*} needs a library that is not installed: $unresolved"
done
bench_files="$(for entry in "${bench_tools[@]}"; do
    echo "${entry%%:*}"
    ldd "${entry%%:*}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | LC_ALL=C sort -u)"

kernel_key="$( {
    echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
    cat "$here/kernel.config"
    cat "$here"/patches/*.patch
    sed -n '/^# kernel-recipe-begin/,/^# kernel-recipe-end/p' "$here/build.sh"
} | sha256sum | cut -c1-16)"
rootfs_key="$( {
    echo "busybox-static $(pkg_version busybox-static)"
    # nubis-run-init is compiled here and linked statically with musl.
    echo "gcc $(gcc -dumpfullversion) musl-tools $(pkg_version musl-tools)"
    cat "$here"/rootfs/*
    sed -n '/^# rootfs-recipe-begin/,/^# rootfs-recipe-end/p' "$here/build.sh"
} | sha256sum | cut -c1-16)"
# The bench rootfs: the rootfs above (its key), the tools' package versions, the
# content of every file copied from the host (so a library upgrade rebuilds it),
# and its own build steps.
bench_key="$( {
    echo "rootfs $rootfs_key"
    for entry in "${bench_tools[@]}"; do echo "${entry#*:} $(pkg_version "${entry#*:}")"; done
    echo "$bench_files" | while IFS= read -r f; do sha256sum "$f"; done
    sed -n '/^# bench-recipe-begin/,/^# bench-recipe-end/p' "$here/build.sh"
} | sha256sum | cut -c1-16)"

kernel_dir="$cache/kernel-$kernel_key"
rootfs_dir="$cache/rootfs-$rootfs_key"
bench_dir="$cache/rootfs-bench-$bench_key"
mkdir -p "$cache"
# Leftovers of interrupted builds.
rm -rf "$cache"/*.build

# kernel-recipe-begin
build_kernel() {
    local work="$cache/kernel-$kernel_key.build"
    rm -rf "$work"
    mkdir -p "$work"
    log "building kernel $kernel_key in $work (about 9 minutes on 2 cores)"
    tar -xf "$linux_tarball" -C "$work"
    local src="$work/linux-source-6.1"
    for p in "$here"/patches/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 --forward --quiet < "$p"
    done
    make -C "$src" -s ARCH=x86_64 tinyconfig
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/kernel.config" >/dev/null
    make -C "$src" -s ARCH=x86_64 olddefconfig
    # Every line of the fragment must have survived Kconfig's dependency
    # resolution, or the kernel silently lacks something the VMM relies on.
    local missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qx -- "$line" "$src/.config" || { log "config: $line did not stick"; missing=1; } ;;
            "# CONFIG_"*" is not set")
                local sym="${line#\# }"; sym="${sym%% *}"
                if grep -q "^$sym=" "$src/.config"; then log "config: $sym should be off"; missing=1; fi ;;
        esac
    done < "$here/kernel.config"
    [ "$missing" = 0 ] || die "kernel.config fragment does not apply cleanly"
    make -C "$src" -s ARCH=x86_64 -j"$jobs" vmlinux bzImage
    mkdir -p "$work/out"
    cp "$src/vmlinux" "$work/out/vmlinux"
    cp "$src/arch/x86/boot/bzImage" "$work/out/bzImage"
    cp "$src/.config" "$work/out/config"
    rm -rf "$kernel_dir"
    mv "$work/out" "$kernel_dir"
    rm -rf "$work"
}
# kernel-recipe-end

# rootfs-recipe-begin
# make_ext4 TREE IMAGE LABEL UUID HASH_SEED SIZE WORK: an ext4 image of TREE
# that is the same bytes on every build. e2fsprogs 1.47.0 ignores
# E2FSPROGS_FAKE_TIME=0 (it takes 0 for "unset"), so the fake time is 1, and
# `mkfs -d` copies each inode's ctime from the host, where it cannot be set:
# debugfs rewrites them.
make_ext4() {
    local tree="$1" image="$2" label="$3" uuid="$4" seed="$5" size="$6" work="$7"
    E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -L "$label" -U "$uuid" \
        -E root_owner=0:0,hash_seed="$seed" -d "$tree" "$image" "$size"
    (cd "$tree" && find . | LC_ALL=C sort | sed 's|^\.||; s|^$|/|' | \
        while IFS= read -r p; do printf 'sif "%s" ctime 1\nsif "%s" atime 0\n' "$p" "$p"; done) > "$work/times.debugfs"
    E2FSPROGS_FAKE_TIME=1 debugfs -w -f "$work/times.debugfs" "$image" >/dev/null 2>"$work/debugfs.err" || \
        die "debugfs failed: $(cat "$work/debugfs.err")"
    ! grep -v '^debugfs [0-9.]* ' "$work/debugfs.err" | grep -q . || die "debugfs: $(head -3 "$work/debugfs.err")"
}

build_rootfs() {
    local work="$cache/rootfs-$rootfs_key.build"
    rm -rf "$work"
    mkdir -p "$work/tree"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,mnt,run}
    local tree="$work/tree"
    cp "$busybox" "$tree/bin/busybox"
    for applet in $("$busybox" --list-full); do
        [ -e "$tree/$applet" ] || ln -s /bin/busybox "$tree/$applet"
    done
    install -m 0755 "$here/rootfs/init" "$tree/init"
    ln -sf /init "$tree/sbin/init"
    install -m 0644 "$here/rootfs/fstab" "$tree/etc/fstab"
    echo "root:x:0:0:root:/root:/bin/sh" > "$tree/etc/passwd"
    echo "root:x:0:" > "$tree/etc/group"
    echo nubis > "$tree/etc/hostname"
    chmod 1777 "$tree/tmp"
    # A hostile guest's tool for the tests (see rootfs/dhcp-flood.c).
    musl-gcc -static -Os -Wall -Wextra -Werror -ffile-prefix-map="$here"=. \
        -o "$tree/sbin/dhcp-flood" "$here/rootfs/dhcp-flood.c"
    strip "$tree/sbin/dhcp-flood"
    # The guest agent on vsock port 52 (see rootfs/nubis-guest-agent.c).
    musl-gcc -static -Os -Wall -Wextra -Werror -ffile-prefix-map="$here"=. \
        -o "$tree/sbin/nubis-guest-agent" "$here/rootfs/nubis-guest-agent.c"
    strip "$tree/sbin/nubis-guest-agent"
    # Reproducible: fixed timestamps and owners, sorted entries.
    find "$tree" -exec touch -h -d @0 {} +
    mkdir -p "$work/out"
    (cd "$tree" && find . -print0 | LC_ALL=C sort -z | \
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) > "$work/out/initramfs.cpio"
    gzip -9 -n -c "$work/out/initramfs.cpio" > "$work/out/initramfs.cpio.gz"
    make_ext4 "$tree" "$work/out/rootfs.ext4" nubis-root 6e756269-7300-4000-8000-000000000001 \
        6e756269-7300-4000-8000-000000000002 64M "$work"
    # The `nubis run` initramfs: only its PID 1 (rdinit=/sbin/nubis-run-init)
    # and the mount points it uses; the command's user space comes from a
    # root disk (rootfs.ext4 by default). Small because unpacking an
    # initramfs costs ~20 s per MiB under KVM's emulator on kvm_pvm hosts.
    local run_tree="$work/run-tree"
    mkdir -p "$run_tree"/{sbin,dev,proc,sys,tmp,run,mnt/lower,mnt/upper,mnt/root}
    musl-gcc -static -Os -Wall -Wextra -Werror -ffile-prefix-map="$here"=. \
        -o "$run_tree/sbin/nubis-run-init" "$here/rootfs/nubis-run-init.c"
    strip "$run_tree/sbin/nubis-run-init"
    find "$run_tree" -exec touch -h -d @0 {} +
    (cd "$run_tree" && find . -print0 | LC_ALL=C sort -z | \
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) > "$work/out/run-initramfs.cpio"
    rm -rf "$rootfs_dir"
    mv "$work/out" "$rootfs_dir"
    rm -rf "$work"
}
# rootfs-recipe-end

# bench-recipe-begin
# rootfs-bench.ext4: the initramfs tree (unpacked from the cached rootfs, so it
# is exactly rootfs.ext4's) plus fio and iperf3, each file at the path the
# host's dynamic loader resolves it to; the guest's ld.so finds them through
# its built-in search path and librados' RUNPATH, without an ld.so.cache.
build_rootfs_bench() {
    local work="$cache/rootfs-bench-$bench_key.build"
    rm -rf "$work"
    mkdir -p "$work/tree" "$work/out"
    local tree="$work/tree"
    (cd "$tree" && cpio --extract --make-directories --preserve-modification-time --quiet) \
        < "$rootfs_dir/initramfs.cpio"
    local f
    while IFS= read -r f; do
        mkdir -p "$tree$(dirname "$f")"
        cp -L "$f" "$tree$f"
    done <<< "$bench_files"
    chown -R 0:0 "$tree"
    find "$tree" -exec touch -h -d @0 {} +
    make_ext4 "$tree" "$work/out/rootfs-bench.ext4" nubis-bench 6e756269-7300-4000-8000-000000000003 \
        6e756269-7300-4000-8000-000000000004 256M "$work"
    rm -rf "$bench_dir"
    mv "$work/out" "$bench_dir"
    rm -rf "$work"
}
# bench-recipe-end

if [ -f "$kernel_dir/vmlinux" ]; then log "kernel $kernel_key: cached"; else build_kernel; fi
if [ -f "$rootfs_dir/run-initramfs.cpio" ]; then log "rootfs $rootfs_key: cached"; else build_rootfs; fi
if [ -f "$bench_dir/rootfs-bench.ext4" ]; then log "rootfs-bench $bench_key: cached"; else build_rootfs_bench; fi

mkdir -p "$out"
for f in vmlinux bzImage config; do cp --reflink=auto "$kernel_dir/$f" "$out/$f"; done
for f in initramfs.cpio initramfs.cpio.gz rootfs.ext4 run-initramfs.cpio; do cp --reflink=auto "$rootfs_dir/$f" "$out/$f"; done
cp --reflink=auto "$bench_dir/rootfs-bench.ext4" "$out/rootfs-bench.ext4"
cp "$here/cmdline" "$out/cmdline"
log "images in $out: $(cd "$out" && ls | tr '\n' ' ')"
