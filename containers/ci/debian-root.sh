# Shared by test-containers.sh and check-install.sh (sourced, not run): the Debian
# bookworm minbase root filesystem both start from, made once per run with debootstrap
# and kept as a tarball, so the container base image and the pristine install check
# use the same root without downloading it twice.

# minbase_tarball TARBALL LOG: make TARBALL (a bookworm minbase root) unless it exists.
# Plain minbase, nothing included: the install check needs a root as bare as a new
# machine; the base image adds its python3 on top (containers/ci/base.Containerfile).
minbase_tarball() {
    local tarball=$1 log=$2
    local mirror=${FACEHUB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    [ -s "$tarball" ] && return 0
    local dir
    dir=$(mktemp -d "$(dirname "$tarball")/minbase.XXXXXX")
    if ! debootstrap --variant=minbase bookworm "$dir/root" "$mirror" > "$log" 2>&1; then
        tail -20 "$log"
        unmount_under "$dir"  # debootstrap mounts /proc and /sys in the root while it runs
        rm -rf --one-file-system "$dir"
        return 1
    fi
    # Written beside and renamed: an interrupted run never leaves a partial tarball.
    tar -C "$dir/root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf --one-file-system "$dir"
}

# unmount_under DIR: unmount everything mounted at or below DIR, deepest first.
# Fails when something is still mounted there, so that the caller never deletes a
# folder that still shows the host's /dev or a read-only bind of its package folders.
unmount_under() {
    local dir
    dir=$(realpath "$1")
    awk -v dir="$dir" '$2 == dir || index($2, dir "/") == 1 {print $2}' /proc/mounts |
        sort -r | xargs -r -n1 umount -l 2>/dev/null
    ! awk -v dir="$dir" '$2 == dir || index($2, dir "/") == 1 {found = 1} END {exit !found}' /proc/mounts
}
