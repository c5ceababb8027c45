#!/usr/bin/env bash
# Install what the deployment checks need on a Debian machine (CI or a developer's):
#   - Debian packages: podman, runc, catatonit, debootstrap (make test-containers),
#     mosquitto and its clients (the broker lockdown test), openssl, procps;
#   - a venv with the pinned lint tools and Ansible (requirements/lint.txt), at
#     $FACEHUB_LINT_VENV (default /tmp/lintvenv), where tests/test_deploy_lint.py looks.
# Safe to run again: it only installs what is missing.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${FACEHUB_LINT_VENV:-/tmp/lintvenv}
# Installed without recommends, so every package the tests use is named here. Of podman's
# recommends only catatonit is needed: the pause binary `podman kube play` builds its pause
# image with (without it: 'finding pause binary: exec: "catatonit": executable file not
# found'); uidmap is kept for rootless use by developers. The rest (fuse-overlayfs,
# slirp4netns, buildah, dbus-user-session) serve rootless podman or separate tools, and the
# network stack (netavark, aardvark-dns) is unused with host networking: podman's Depends
# bring containernetworking-plugins, enough for that. runc is named because the test pins
# it (podman depends on crun | runc). procps: pgrep in test-containers.sh's cleanup.
# containers/ci/check-install.sh proves the list on a bare Debian root.
packages=(podman runc catatonit debootstrap uidmap mosquitto mosquitto-clients openssl ca-certificates
          python3-venv procps)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/ansible-lint" ] || ! cmp -s "$root/requirements/lint.txt" "$venv/.requirements"; then
    python=${PYTHON:-python3}
    if command -v uv >/dev/null 2>&1; then
        uv venv --allow-existing -p "$python" "$venv" >/dev/null
        uv pip install --python "$venv/bin/python" -r "$root/requirements/lint.txt"
    else
        "$python" -m venv "$venv"
        "$venv/bin/pip" install -q -r "$root/requirements/lint.txt"
    fi
    cp "$root/requirements/lint.txt" "$venv/.requirements"
fi
# The whole of `ansible --version` read first: cut short by `head`, it dies of a broken pipe.
ansible_version=$("$venv/bin/ansible" --version)
echo "lint tools in $venv/bin: ${ansible_version%%$'\n'*}, $("$venv/bin/hadolint" --version)"
