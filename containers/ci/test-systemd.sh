#!/usr/bin/env bash
# The edge play with facehub_edge_runtime: systemd, against a real systemd: a Debian bookworm
# root filesystem with systemd (debootstrap), booted in a privileged podman container (rootful,
# runc, cgroupfs, host networking, storage in a temporary folder):
#
#   1. ansible/edge.yml runs against it (containers.podman connection): Debian's mosquitto on
#      loopback, the facehub user, FaceHub in /opt/facehub from a wheel built here, the YuNet
#      model, the settings, the unit; the play waits for `facehub health`; a second run
#      changes nothing;
#   2. the unit runs as systemd was told (notify, watchdog, user), faces flow from the sample
#      clip through the local broker to the forwarder's spool and the logger (seen in /metrics),
#      the broker listens on 127.0.0.1 only;
#   3. a frozen supervisor (SIGSTOP) is killed by the watchdog and the unit comes back healthy
#      with its spool; `systemctl stop` ends it cleanly.
#
# No cloud broker: the forwarder keeps the faces in its spool. Needs root, podman, runc,
# debootstrap, openssl (containers/ci/install-deps.sh) and the lint venv with Ansible.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=containers/ci/debian-root.sh
. "$root/containers/ci/debian-root.sh"  # unmount_under
venv=${FACEHUB_LINT_VENV:-/tmp/lintvenv}
mirror=${FACEHUB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
shared=${FACEHUB_SHARED:-$root/../shared}
keep=${FACEHUB_KEEP_WORK:-}
name=facehub-systemd-edge
started=$(date +%s)
passed=0

say() { printf '[%4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }
check() {  # check "what" command...: one counted assertion
    local what=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        say "ok: $what"
    else
        fail "$what"
    fi
}
poll() {  # poll "what" timeout command...: retry until it succeeds or the deadline passes
    local what=$1 timeout=$2
    shift 2
    local deadline=$(( $(date +%s) + timeout ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 1
    done
    say "ready: $what"
}

[ "$(id -u)" = 0 ] || fail "run as root (rootful podman with runc and cgroupfs)"
for tool in podman runc debootstrap openssl; do
    command -v "$tool" >/dev/null || fail "$tool is missing: run containers/ci/install-deps.sh"
done
[ -x "$venv/bin/ansible-playbook" ] || fail "no Ansible in $venv: run containers/ci/install-deps.sh"

work=$(mktemp -d /tmp/facehub-systemd.XXXXXX)
chmod 0755 "$work"
stop_leftovers() {  # processes whose command line names this run's folder (conmon, podman)
    local deadline=$(( $(date +%s) + 20 ))
    while pgrep -f "$work/" >/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
        pgrep -f "$work/" | xargs -r kill 2>/dev/null
        sleep 0.5
    done
}
cleanup() {
    local status=$?
    set +e
    if [ "$status" != 0 ] && podman container exists "$name" 2>/dev/null; then
        say "diagnostics:"
        podman exec "$name" systemctl status --no-pager facehub-edge mosquitto 2>&1 | tail -30
        podman exec "$name" journalctl --no-pager -n 40 -u facehub-edge 2>&1
    fi
    podman rm -f -t 5 "$name" >/dev/null 2>&1
    stop_leftovers
    podman system reset --force >/dev/null 2>&1
    stop_leftovers
    unmount_under "$work"
    if [ -n "$keep" ]; then say "kept $work"; else rm -rf --one-file-system "$work"; fi
    say "done in $(( $(date +%s) - started ))s"
    echo "test-systemd: $passed passed, $([ "$status" = 0 ] && echo 0 || echo 1) failed"
    exit "$status"
}
trap cleanup EXIT

cat > "$work/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=4096:4096", "nproc=4000:4000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$work/podman-events.log"
tmp_dir = "$work/libpod-tmp"
EOF
cat > "$work/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf
export ANSIBLE_CONFIG=$root/ansible.cfg ANSIBLE_LOCAL_TEMP=$work/ansible-tmp ANSIBLE_NOCOLOR=1

# A booted Debian with systemd: the box the play is for.
t0=$(date +%s)
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,sudo,ca-certificates,procps \
    bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
unmount_under "$work/rootfs" || fail "something is still mounted in $work/rootfs"
tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/sbin/init"]' - localhost/facehub-ci-systemd:bookworm \
    >/dev/null
rm -rf --one-file-system "$work/rootfs"
podman run -d --name "$name" --hostname "$name" --privileged --systemd=always \
    localhost/facehub-ci-systemd:bookworm /sbin/init >/dev/null
poll "systemd booted in $name" 60 sh -c "podman exec $name systemctl is-system-running | grep -Eq 'running|degraded'" ||
    fail "systemd did not boot in the container"
say "booted Debian with systemd $(podman exec "$name" systemctl --version | head -1 | cut -d' ' -f2) in $(( $(date +%s) - t0 ))s"
# The box trusts what this machine trusts (a proxy's CA): the system's bundle for the model's
# download, pip's own option for pip (it reads its own bundle); and the same package mirror.
podman cp /etc/ssl/certs/ca-certificates.crt "$name:/etc/ssl/certs/ca-certificates.crt"
pip_args="--cert /etc/ssl/certs/ca-certificates.crt${PIP_INDEX_URL:+ --index-url $PIP_INDEX_URL}"

# Ports picked now, after the slow boot, to leave the tests of others little time to take them.
# The YuNet model the play fetches: the test suite's copy, offered to the box as a file:// URL
# (the model zoo may be out of reach here); without it the play fetches none and Haar runs.
model=$shared/models/face_detection_yunet.onnx
if [ -f "$model" ]; then
    podman cp "$model" "$name:/root/yunet.onnx"
    yunet_vars="facehub_edge_yunet_url: file:///root/yunet.onnx
          facehub_edge_yunet_sha256: $(sha256sum "$model" | cut -d' ' -f1)"
    backend=yunet
else
    yunet_vars="facehub_edge_yunet_fetch: false"
    backend=haar
fi

free_port() { "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mqtt_port=$(free_port)
metrics_port=$(free_port)
cloud_port=$(free_port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=ci-ca \
    -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
cat > "$work/inventory.yml" <<EOF
all:
  children:
    edge:
      hosts:
        $name:
          ansible_connection: containers.podman.podman
          ansible_python_interpreter: /usr/bin/python3
          facehub_edge_runtime: systemd
          facehub_edge_device_id: ci-systemd-1
          facehub_edge_cloud_password: "a \\"quoted\\" \$password\`"
          facehub_edge_cloud_ca_file: $work/ca.crt
          facehub_edge_cloud_host: 127.0.0.1
          facehub_edge_cloud_port: $cloud_port
          facehub_edge_mqtt_port: $mqtt_port
          facehub_edge_metrics_port: $metrics_port
          facehub_edge_camera_device: ""
          facehub_edge_detector_source: /opt/facehub/lib/python3.11/site-packages/facehub/samples/astronaut.mp4
          facehub_edge_extra_env: {FACEHUB_DETECTOR_LOOP: "true"}
          facehub_edge_systemd_pip_args: "$pip_args"
          $yunet_vars
EOF

# 1. The play, twice.
t0=$(date +%s)
"$venv/bin/ansible-playbook" -i "$work/inventory.yml" "$root/ansible/edge.yml" > "$work/play.log" 2>&1 ||
    { tail -40 "$work/play.log"; fail "the edge play (systemd runtime)"; }
say "edge play ran in $(( $(date +%s) - t0 ))s: $(grep -E "^$name" "$work/play.log" | tr -s ' ')"
"$venv/bin/ansible-playbook" -i "$work/inventory.yml" "$root/ansible/edge.yml" --diff > "$work/play-2.log" 2>&1 ||
    { tail -40 "$work/play-2.log"; fail "the edge play, second run"; }
changed_tasks=$(awk '/^TASK /{task=$0} /^changed:/{print "    " task}' "$work/play-2.log")
check "the play is idempotent (second run changed nothing)${changed_tasks:+; changed:
$changed_tasks}" test -z "$changed_tasks"

# 2. The unit and what flows through it.
box() { podman exec "$name" "$@"; }
health() { box runuser -u facehub -- env FACEHUB_SUPERVISOR_STATE_DIR=/run/facehub /opt/facehub/bin/facehub health; }
show() { box systemctl show facehub-edge --value -p "$1"; }
healthy() { health >/dev/null 2>&1; }
check "facehub health as the facehub user: $(health 2>&1)" healthy
check "the unit is Type=notify with a 30 s watchdog, as user facehub" \
    test "$(show Type) $(show WatchdogUSec) $(show User)" = "notify 30s facehub"
check "systemd shows the supervisor's status: $(show StatusText)" grep -q "components up" <<<"$(show StatusText)"
check "the settings file is root's, mode 0600" test "$(box stat -c '%U %a' /etc/facehub/edge.env)" = "root 600"
check "the K3s broker configuration, on loopback" grep -qx "listener $mqtt_port 127.0.0.1" <<<"$(box cat /etc/mosquitto/mosquitto.conf)"
listening() {  # the addresses listening on a TCP port, from this (the host's) network namespace
    "$venv/bin/python" - "$1" <<'EOF'
import sys
port = f":{int(sys.argv[1]):04X}"
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(port) and fields[3] == "0A":
            print(fields[1])
EOF
}
check "the broker listens on 127.0.0.1 only: $(listening "$mqtt_port" | tr '\n' ' ')" \
    test "$(listening "$mqtt_port")" = "$(printf '0100007F:%04X' "$mqtt_port")"
serving() { box journalctl --no-pager -u facehub-edge | grep -o 'serving metrics on .*\|cannot serve metrics.*' | tail -1; }
check "the supervisor serves /metrics on 127.0.0.1:$metrics_port: $(serving)" \
    grep -q "serving metrics on http://127.0.0.1:$metrics_port/metrics" <<<"$(serving)"
metric() {  # metric NAME COMPONENT: its value in the supervisor's /metrics, 0 when absent
    "$venv/bin/python" - "$metrics_port" "$1" "$2" <<'EOF'
import sys, urllib.request
port, name, component = sys.argv[1:]
body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
print(next((line.split()[-1] for line in body.splitlines() if line.startswith(f'{name}{{component="{component}"}}')), 0))
EOF
}
flowing() { [ "$(metric facehub_spooled_total forwarder | cut -d. -f1)" -gt 0 ] &&
            [ "$(metric facehub_logged_total logger | cut -d. -f1)" -gt 0 ]; }
poll "faces published, spooled by the forwarder and logged" 60 flowing ||
    fail "no faces through the local broker: $(box journalctl --no-pager -n 20 -u facehub-edge)"
check "faces went camera -> broker -> spool and logger: published $(metric facehub_faces_published_total detector), spooled $(metric facehub_spooled_total forwarder), logged $(metric facehub_logged_total logger)" flowing
check "the spool is in the unit's StateDirectory" box test -s /var/lib/facehub/spool.db
check "the detector runs $backend (backend auto, the fetched model linked at /opt/facehub/models)" \
    sh -c "podman exec $name journalctl --no-pager -u facehub-edge | grep -q 'detector: $backend backend'"

# 3. The watchdog, and a clean stop.
depth=$(metric facehub_spool_depth forwarder)
supervisor=$(show MainPID)
box kill -STOP "$supervisor"
say "froze the supervisor (pid $supervisor) with $depth faces in the spool"
poll "the watchdog restarted the unit" 60 sh -c "[ \"\$(podman exec $name systemctl show facehub-edge --value -p NRestarts)\" = 1 ]" ||
    fail "no restart 60 s after the supervisor froze (NRestarts $(show NRestarts))"
check "the journal says why: $(box journalctl --no-pager -u facehub-edge | grep -m1 -o 'Watchdog timeout.*')" \
    sh -c "podman exec $name journalctl --no-pager -u facehub-edge | grep -q 'Watchdog timeout'"
poll "healthy again" 90 healthy || fail "not healthy after the watchdog's restart: $(health 2>&1)"
kept() { [ "$(metric facehub_spool_depth forwarder | cut -d. -f1)" -ge "${depth%%.*}" ]; }
poll "the forwarder reports its spool again" 30 kept || true
check "the spool survived the restart ($(metric facehub_spool_depth forwarder) faces, $depth before)" kept
box systemctl stop facehub-edge
check "systemctl stop ends it cleanly ($(show Result), exit status $(show ExecMainStatus))" \
    test "$(show Result) $(show ExecMainStatus)" = "success 0"
say "total $(( $(date +%s) - started ))s"
