#!/usr/bin/env bash
# Pristine-root install check: does `.ci/run --install-only` turn a brand-new Debian 12
# machine into one with every tool the tests and the container test use? A machine the
# repo has already been installed on cannot tell: whatever came there some other way
# (a package's recommends, a developer's apt-get) hides a missing install step.
#
#   check-install.sh [MINBASE_TARBALL]
#
# In a chroot of a Debian bookworm minbase root (debian-root.sh; MINBASE_TARBALL is reused
# when given, as test-containers.sh does) it puts a clean export of the repository (the
# tracked files) with ../shared beside it, runs `.ci/run --install-only` as CI would (root,
# CI=true), then looks for each tool. It reaches the network only as the install does: apt
# and pip/uv, through the host's own apt sources, pip/uv configuration and CA certificates;
# services that packages would start are not started (policy-rc.d). Needs root and
# debootstrap. The last line says "ok", or names what is missing.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${FACEHUB_SHARED:-$root/../shared}
started=$(date +%s)
# shellcheck source=containers/ci/debian-root.sh
. "$root/containers/ci/debian-root.sh"

say() { printf '[%4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
verdict() { echo "check-install: $*"; }

[ "$(id -u)" = 0 ] || { verdict "FAILED: run as root (chroot, mounts)"; exit 1; }
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 ||
    { verdict "FAILED: $root is not a git checkout (the export is its tracked files)"; exit 1; }

work=$(mktemp -d /tmp/facehub-check-install.XXXXXX)
chroot_dir=$work/root
repo=/build/facehub  # where the clone is inside the chroot; ../shared is /build/shared

# All of it in memory: on disk, dpkg's syncs and removing the ~1.5 GB of small files at the
# end took longer than the install itself. Unmounting it (cleanup) frees it at once.
mount -t tmpfs -o size=6g,mode=0755 facehub-check-install "$work"

cleanup() {
    local status=$?
    set +e
    # Anything still running inside the chroot (started by this run: nothing else has its
    # root there) would keep the mounts busy.
    for proc in /proc/[0-9]*; do
        [ "$(readlink "$proc/root" 2>/dev/null)" = "$chroot_dir" ] && kill -9 "${proc#/proc/}" 2>/dev/null
    done
    if unmount_under "$work"; then
        rm -rf --one-file-system "$work"
    else
        say "left $work: something is still mounted there"
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT

# 1. The root: plain minbase, as bare as a new machine.
tarball=${1:-$work/minbase.tar}
t0=$(date +%s)
minbase_tarball "$tarball" "$work/debootstrap.log" || { verdict "FAILED: debootstrap"; exit 1; }
mkdir "$chroot_dir"
tar -C "$chroot_dir" -xf "$tarball"
say "minbase root ready in $(( $(date +%s) - t0 ))s"

# 2. What the machine itself provides, and nothing more: how it reaches Debian (sources,
#    keyrings, Acquire settings such as proxies), its name server, its own CA certificates
#    (installed into the bundle when the install brings ca-certificates), and its pip/uv
#    configuration with the local package folders that configuration names.
rm -f "$chroot_dir/etc/apt/sources.list"  # debootstrap's own; the host's sources replace it
for source in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$source" ] || continue
    cp "$source" "$chroot_dir$source"
    # keyrings that a source is signed by, where the minbase root has none of its own
    for keyring in $(grep -hoE '/[^] ]+\.(gpg|asc)' "$source" || true); do
        if [ -f "$keyring" ] && [ ! -e "$chroot_dir$keyring" ]; then
            install -D -m 0644 "$keyring" "$chroot_dir$keyring"
        fi
    done
done
for dir in /etc/apt/keyrings /etc/apt/trusted.gpg.d /etc/apt/auth.conf.d /usr/local/share/ca-certificates; do
    if [ -d "$dir" ]; then
        mkdir -p "$chroot_dir$dir"
        cp -a "$dir/." "$chroot_dir$dir/"
    fi
done
for conf in /etc/apt/apt.conf.d/*; do
    if grep -qE '^[[:space:]]*Acquire::' "$conf"; then cp "$conf" "$chroot_dir/etc/apt/apt.conf.d/"; fi
done
cp -L /etc/resolv.conf "$chroot_dir/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$chroot_dir/usr/sbin/policy-rc.d"  # no mosquitto started here
chmod 0755 "$chroot_dir/usr/sbin/policy-rc.d"

pass_env=()  # the install's view of the environment: PATH and these, nothing else
for name in $(compgen -e); do
    case $name in
        PIP_* | UV_* | SSL_CERT_FILE | SSL_CERT_DIR | REQUESTS_CA_BUNDLE | \
        http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY)
            pass_env+=("$name=${!name}") ;;
    esac
done
configs=()
for config in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/uv/uv.toml \
              "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf" "$HOME/.config/uv/uv.toml"; do
    [ -f "$config" ] || continue
    configs+=("$config")
    target=${config/#$HOME//root}  # the install runs as root, HOME=/root
    install -D -m 0644 "$config" "$chroot_dir$target"
done
# What that configuration names: local package folders (find-links, file:// indexes) are
# bound read-only (a "simple" index links to its files beside it: its parent folder is
# bound); files (a constraints file) are copied. The CA bundle and other system folders
# stay the chroot's own: its ca-certificates package makes them.
bound=()
for path in $( (cat "${configs[@]}" /dev/null; printf '%s\n' "${pass_env[@]}" | grep -E '^(PIP|UV)_') |
               grep -oE '(file://)?/[^[:space:]"'"'"',;]+' | sed 's|^file://||' | sort -u); do
    case $path in /etc/ssl/* | /usr/* | /var/* | /proc/* | /sys/* | /dev/* | /run/*) continue ;; esac
    if [ -f "$path" ]; then
        [ -e "$chroot_dir$path" ] || install -D -m 0644 "$path" "$chroot_dir$path"
        continue
    fi
    [ -d "$path" ] || continue
    case $path in */simple | */simple/) path=$(dirname "$path") ;; esac
    for done_path in "${bound[@]}"; do
        case $path/ in "$done_path"/*) continue 2 ;; esac  # within one bound already
    done
    bound+=("$path")
    mkdir -p "$chroot_dir$path"
    mount --bind "$path" "$chroot_dir$path"
    mount -o remount,bind,ro "$chroot_dir$path"
    say "package folder $path bound read-only"
done

# 3. The repository as a fresh clone has it (tracked files, as they are in the work tree),
#    and ../shared beside it, read-only as CI lays it.
mkdir -p "$chroot_dir$repo" "$chroot_dir/build/shared"
git -C "$root" ls-files -z | tar -C "$root" --null -T - --ignore-failed-read -cf - 2>/dev/null |
    tar -C "$chroot_dir$repo" -xf -
if [ -d "$shared" ]; then
    mount --bind "$shared" "$chroot_dir/build/shared"
    mount -o remount,bind,ro "$chroot_dir/build/shared"
fi

mount -t proc proc "$chroot_dir/proc"
mount -t sysfs sysfs "$chroot_dir/sys"
mount --bind /dev "$chroot_dir/dev"
mount --bind /dev/pts "$chroot_dir/dev/pts"

in_chroot() {
    chroot "$chroot_dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 CI=true \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${pass_env[@]}" "$@"
}

# 4. The install, exactly as .ci/run does it.
t0=$(date +%s)
say "running .ci/run --install-only in the chroot (output in $work/install.log while it runs)"
if ! in_chroot bash -c "cd $repo && bash .ci/run --install-only" < /dev/null > "$work/install.log" 2>&1; then
    tail -30 "$work/install.log"
    verdict "FAILED: .ci/run --install-only failed on a pristine root ($(tail -1 "$work/install.log"))"
    exit 1
fi
say "install done in $(( $(date +%s) - t0 ))s; the root now takes $(df -h --output=used "$work" | tail -1 | tr -d " ") of its tmpfs"

# 5. Every tool the tests (make test) and the container test (make test-containers) use,
#    looked for inside the chroot (a venv's links point into it, not into the host).
missing=()
in_root() { in_chroot sh -c "$1" >/dev/null 2>&1; }
for tool in make git ip pgrep openssl mosquitto mosquitto_passwd mosquitto_sub mosquitto_pub \
            podman runc debootstrap chromium chromedriver systemd-analyze; do
    in_root "command -v $tool" || missing+=("$tool")
done
# podman's pause binary (`podman kube play`): looked for in its helper folders, then on PATH.
in_root 'for dir in /usr/local/libexec/podman /usr/local/lib/podman /usr/libexec/podman /usr/lib/podman; do
             [ -x "$dir/catatonit" ] && exit 0
         done
         command -v catatonit' || missing+=("catatonit (podman's pause binary)")
for module in cv2 paho.mqtt s3fs moto pytest selenium prometheus_client facehub; do
    in_root "$repo/.venv/bin/python -c 'import $module'" || missing+=("$module (.venv)")
done
lint_venv=/tmp/lintvenv  # install-deps.sh's default, where tests/test_deploy_lint.py looks
for tool in ansible-playbook ansible-lint yamllint hadolint kubernetes-validate; do
    in_root "test -x $lint_venv/bin/$tool" || missing+=("$tool ($lint_venv)")
done
in_root "$lint_venv/bin/ansible-playbook --version" || missing+=("a working ansible-playbook ($lint_venv)")

if [ ${#missing[@]} -gt 0 ]; then
    verdict "FAILED: missing after .ci/run --install-only: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g')"
    exit 1
fi
verdict "ok: .ci/run --install-only on a pristine Debian root gave every tool the tests use ($(( $(date +%s) - started ))s)"
