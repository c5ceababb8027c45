#!/usr/bin/env bash
# Real containers without a Docker engine: podman (Debian's, rootful) with runc,
# cgroupfs and host networking, no registry (--pull=never), everything made here:
#
#   1. a Debian bookworm minbase root filesystem (debootstrap, debian-root.sh), imported
#      and given python3 as the base image; a mosquitto image built on it (stand-in for
#      eclipse-mosquitto);
#   2. the real containers/Dockerfile built on that base; `facehub` checked in it;
#   3. the cloud play (ansible/cloud.yml: mosquitto + facehub_cloud roles) run against
#      podman's Docker-compatible API (podman system service), TLS broker and savers;
#   4. the edge manifests rendered by the facehub_edge role (ansible/edge.yml) and run
#      with `podman kube play`: the local broker and the FaceHub edge pod;
#   5. faces detected at the edge, forwarded over TLS with the device's credentials,
#      stored by the containerised saver: the run passes when they are on disk;
#   6. the edge fleet: the role's DaemonSet layout (facehub_edge_k3s_layout: daemonset) for
#      two camera nodes, played as the pod of one of them (podman_play.py --node), which
#      must take its device id from the node name, read that node's password from the
#      fleet's Secret and get its faces stored;
#   7. the cloud savers of containers/k8s-cloud/ (the Deployment, two replicas) against a
#      TLS broker and moto's S3 made here: faces published to the broker land in the bucket;
#   8. the install on a pristine machine: `.ci/run --install-only` in a chroot of the same
#      minbase root gives every tool the tests and this test use (check-install.sh).
#
# All state (podman storage, images, the API socket, configs, faces) lives in one
# temporary folder, removed at the end. Needs root, podman, runc, debootstrap
# (containers/ci/install-deps.sh), the lint venv with Ansible ($FACEHUB_LINT_VENV) and the
# project's venv (.venv: moto's S3 server and the MQTT client that publishes faces in step 7).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=containers/ci/debian-root.sh
. "$root/containers/ci/debian-root.sh"  # minbase_tarball, shared with check-install.sh
venv=${FACEHUB_LINT_VENV:-/tmp/lintvenv}
project_python=${FACEHUB_PYTHON:-$root/.venv/bin/python}
shared=${FACEHUB_SHARED:-$root/../shared}
keep=${FACEHUB_KEEP_WORK:-}
device=ci-edge-1
# The fleet: its K3s server and the camera node whose pod is played (not the server, so that
# the password picked is the node's own, not the Secret's first).
fleet_server=ci-camera-1
fleet_node=ci-camera-2
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
# poll "what" timeout command...: retry until it succeeds or the deadline passes
poll() {
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
for tool in podman runc catatonit debootstrap openssl pgrep; do
    command -v "$tool" >/dev/null || fail "$tool is missing: run containers/ci/install-deps.sh"
done
[ -x "$venv/bin/ansible-playbook" ] || fail "no Ansible in $venv: run containers/ci/install-deps.sh"
"$project_python" -c 'import moto.server, boto3, paho' 2>/dev/null || fail "no project venv at $project_python: run make venv"

work=$(mktemp -d /tmp/facehub-containers.XXXXXX)
chmod 0755 "$work"
service_pid=""
moto_pid=""
stop_leftovers() {  # processes whose command line names this run's folder
    local deadline=$(( $(date +%s) + 20 ))
    while pgrep -f "$work/" >/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
        pgrep -f "$work/" | xargs -r kill 2>/dev/null
        sleep 0.5
    done
}
cleanup() {
    local status=$?
    set +e
    if [ "$status" != 0 ]; then
        say "diagnostics:"
        podman ps -a --format '{{.Names}} {{.Status}}' 2>/dev/null
        for name in $(podman ps -a --format '{{.Names}}' 2>/dev/null); do
            case $name in *-infra) continue ;; esac
            echo "--- logs of $name"
            podman logs --tail 40 "$name" 2>&1
        done
    fi
    [ -n "$service_pid" ] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null
    [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null && wait "$moto_pid" 2>/dev/null
    podman pod rm -f -a -t 5 >/dev/null 2>&1
    podman rm -f -a -t 5 >/dev/null 2>&1
    # conmon lingers after `podman exec` (an exit delay) and then runs a cleanup that
    # touches the storage: end this run's (and only this run's) before removing it.
    stop_leftovers
    podman system reset --force >/dev/null 2>&1
    stop_leftovers
    grep " $work/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
    if [ -n "$keep" ]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
    say "done in $(( $(date +%s) - started ))s"
    echo "test-containers: $passed passed, $([ "$status" = 0 ] && echo 0 || echo 1) failed"
    exit "$status"
}
trap cleanup EXIT

# podman, configured for this machine, with every bit of state under $work.
cat > "$work/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
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
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphRoot}}' |
    grep -q "^runc cgroupfs $work/storage" || fail "podman does not use runc/cgroupfs/$work"
say "podman $(podman version --format '{{.Client.Version}}') with runc, cgroupfs, storage in $work"

build() {  # build TAG FILE [args]: podman build with the host's CA bundle for pip
    local tag=$1 file=$2
    shift 2
    local extra=()
    [ -n "${PIP_INDEX_URL:-}" ] && extra+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
    podman build --pull=never --network host --format docker \
        --build-arg BASE_IMAGE=localhost/facehub-ci-base:bookworm \
        --build-arg PIP_CERT=/etc/ssl/host-ca.crt \
        --build-arg FACEHUB_FETCH_YUNET=false \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro \
        "${extra[@]}" "$@" -f "$file" -t "$tag" "$root" > "$work/build-${tag##*/}.log" 2>&1 ||
        { tail -30 "$work/build-${tag##*/}.log"; fail "build of $file"; }
}

# 1. Base image: Debian minbase, from the Debian archive, with python3. The minbase
#    tarball is kept for step 6, which starts a pristine machine from it.
t0=$(date +%s)
minbase_tar=${FACEHUB_CI_MINBASE_TAR:-$work/minbase.tar}  # a developer's shortcut: keep it across runs
[ -s "$minbase_tar" ] && say "reusing the minbase root in $minbase_tar"
minbase_tarball "$minbase_tar" "$work/debootstrap.log" || fail "debootstrap"
podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$minbase_tar" localhost/facehub-ci-minbase:bookworm >/dev/null
build localhost/facehub-ci-base:bookworm "$root/containers/ci/base.Containerfile"
say "base image made in $(( $(date +%s) - t0 ))s"

# 2. The FaceHub image from the real Dockerfile, and the broker image.
t0=$(date +%s)
build localhost/facehub:ci "$root/containers/Dockerfile"
build_seconds=$(( $(date +%s) - t0 ))
say "facehub image built in ${build_seconds}s ($(podman image inspect localhost/facehub:ci --format '{{.Size}}' | awk '{printf "%d MB", $1/1e6}'))"
t0=$(date +%s)
build localhost/facehub-ci-mosquitto:latest "$root/containers/ci/mosquitto.Containerfile"
say "mosquitto image built in $(( $(date +%s) - t0 ))s"

image=localhost/facehub:ci
check "the image runs facehub as user 10001" \
    test "$(podman run --rm --no-healthcheck --entrypoint id "$image" -u)" = 10001
check "facehub --version in the image" podman run --rm --no-healthcheck "$image" --version
check "the image's HEALTHCHECK is facehub health" \
    grep -q "facehub health" <<<"$(podman image inspect "$image" --format '{{.Config.Healthcheck.Test}}' | tr -d '[]' | tr -s ' ')"
health_out=$(podman run --rm --no-healthcheck "$image" health 2>&1) && health_rc=0 || health_rc=$?
check "facehub health says unhealthy (1) with no supervisor running: $health_out" test "$health_rc" = 1

# 3. The cloud: Ansible's cloud play against podman's Docker API.
local_inventory() {  # the start of an inventory whose hosts are this machine, played with the test venv
    printf 'all:\n  vars:\n    ansible_connection: local\n    ansible_python_interpreter: %s/bin/python\n' "$venv"
    printf '    ansible_become: false\n  children:\n'
}
free_port() { "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cloud_port=$(free_port)
edge_port=$(free_port)
cloud_metrics_port=$(free_port)
edge_metrics_port=$(free_port)
device_password=$(openssl rand -hex 16)
fleet_server_password=$(openssl rand -hex 16)
fleet_node_password=$(openssl rand -hex 16)
fleet_port=$(free_port)
fleet_metrics_port=$(free_port)
saver_password=$(openssl rand -hex 16)
mkdir -p "$work/fetched"  # the faces folder is made by the facehub_cloud role
podman system service --time=0 "unix://$work/podman.sock" > "$work/podman-service.log" 2>&1 &
service_pid=$!
export DOCKER_HOST=unix://$work/podman.sock
poll "podman's Docker API on $DOCKER_HOST" 30 test -S "$work/podman.sock"

{ local_inventory; cat <<EOF
    cloud:
      hosts:
        cloud-ci:
          mosquitto_config_dir: $work/cloud/mosquitto
          mosquitto_ca_dir: $work/cloud/ca
          mosquitto_data_dir: $work/cloud/data
          mosquitto_tls_port: $cloud_port
          mosquitto_bind_address: 127.0.0.1
          mosquitto_devices: [$device, $fleet_server, $fleet_node]
          mosquitto_passwords: {$device: "$device_password", $fleet_server: "$fleet_server_password",
                                $fleet_node: "$fleet_node_password"}
          mosquitto_saver_password: "$saver_password"
          mosquitto_saver_instances: 2
          mosquitto_ca_fetch_dir: $work/fetched
          mosquitto_image: localhost/facehub-ci-mosquitto:latest
          mosquitto_image_pull: false
          mosquitto_network: host
          # podman's Docker API reports "cap_drop: ALL" as the list of capabilities, adds
          # rbind/rprivate to binds and tmpfs of its own to read-only containers, which
          # Docker does not: compare everything else.
          mosquitto_container_comparisons: &podman_comparisons
            networks: strict
            cap_drop: ignore
            volumes: ignore
            tmpfs: ignore
          facehub_cloud_image: $image
          facehub_cloud_image_pull: false
          facehub_cloud_network: host
          facehub_cloud_broker_host: 127.0.0.1
          facehub_cloud_broker_port: $cloud_port
          facehub_cloud_ca_file: $work/cloud/mosquitto/tls/ca.crt
          facehub_cloud_saver_password: "$saver_password"
          facehub_cloud_saver_instances: 2
          facehub_cloud_storage_dir: $work/faces
          facehub_cloud_memory: 1g
          facehub_cloud_metrics_port: $cloud_metrics_port
          facehub_cloud_container_comparisons: *podman_comparisons
    edge:
      hosts:
        edge-ci:
          facehub_edge_manifests_dir: $work/manifests
          facehub_edge_wait: false
          facehub_edge_device_id: $device
          facehub_edge_image: $image
          facehub_edge_image_pull_policy: Never
          facehub_edge_mosquitto_image: localhost/facehub-ci-mosquitto:latest
          facehub_edge_mqtt_host: 127.0.0.1
          facehub_edge_mqtt_port: $edge_port
          facehub_edge_mqtt_bind_address: 127.0.0.1
          facehub_edge_cloud_host: 127.0.0.1
          facehub_edge_cloud_port: $cloud_port
          facehub_edge_cloud_password: "$device_password"
          facehub_edge_cloud_ca_file: $work/fetched/ca.crt
          facehub_edge_camera_device: ""
          facehub_edge_node_selector: {}
          facehub_edge_spool_size: 256Mi
          facehub_edge_metrics_port: $edge_metrics_port
EOF
} > "$work/inventory.yml"
chmod 0600 "$work/inventory.yml"

t0=$(date +%s)
"$venv/bin/ansible-playbook" -i "$work/inventory.yml" "$root/ansible/cloud.yml" \
    --skip-tags docker,s3fs_mount > "$work/cloud-play.log" 2>&1 ||
    { tail -40 "$work/cloud-play.log"; fail "the cloud play"; }
say "cloud play ran in $(( $(date +%s) - t0 ))s: $(grep -E '^cloud-ci' "$work/cloud-play.log" | tr -s ' ')"
"$venv/bin/ansible-playbook" -i "$work/inventory.yml" "$root/ansible/cloud.yml" \
    --skip-tags docker,s3fs_mount --diff > "$work/cloud-play-2.log" 2>&1 ||
    { tail -40 "$work/cloud-play-2.log"; fail "the cloud play, second run"; }
changed_tasks=$(awk '/^TASK /{task=$0} /^changed:/{print "    " task}' "$work/cloud-play-2.log")
check "the cloud play is idempotent (second run changed nothing)${changed_tasks:+; changed:
$changed_tasks}" test -z "$changed_tasks"
check "the broker and the savers run as containers made through the Docker API" \
    test "$(podman ps --filter name=facehub-mosquitto --filter name=facehub-saver --format '{{.Names}}' | wc -l)" = 2
check "the savers are healthy (facehub health in the container)" \
    podman exec facehub-saver facehub health
# scrape PORT: /metrics on 127.0.0.1 answers with the supervisor's children
scrape() {
    "$venv/bin/python" -c "import sys, urllib.request
body = urllib.request.urlopen('http://127.0.0.1:$1/metrics', timeout=5).read().decode()
sys.exit(0 if 'facehub_child_up{' in body else 1)"
}
poll "the savers' /metrics on 127.0.0.1:$cloud_metrics_port" 30 scrape "$cloud_metrics_port" ||
    fail "the savers never served /metrics on 127.0.0.1:$cloud_metrics_port"

# 4. The edge: the role renders the manifests, podman plays them.
t0=$(date +%s)
clip=$(podman run --rm --no-healthcheck --entrypoint python3 "$image" -c \
    'from facehub.edge.detection.source import SAMPLE_CLIP; print(SAMPLE_CLIP)' 2>/dev/null || true)
if [ -n "$clip" ]; then
    say "edge source: the sample clip in the image ($clip)"
    extra_vars=(-e "{\"facehub_edge_detector_source\": \"$clip\", \"facehub_edge_extra_env\": {\"FACEHUB_DETECTOR_LOOP\": \"true\"}}")
else
    # No sample in the package: a clip made in the image from a shared photo with faces.
    photo=$(ls "$shared"/faces/20*.jpg 2>/dev/null | head -1)
    [ -n "$photo" ] || fail "no sample clip in the image and no photo in $shared/faces"
    mkdir -p "$work/clip" && chmod 0777 "$work/clip"
    podman run --rm --no-healthcheck --entrypoint python3 -v "$photo:/in.jpg:ro" -v "$work/clip:/out" "$image" -c '
import cv2
frame = cv2.imread("/in.jpg")
out = cv2.VideoWriter("/out/clip.avi", cv2.VideoWriter_fourcc(*"MJPG"), 10, (frame.shape[1], frame.shape[0]))
for _ in range(20):
    out.write(frame)
out.release()'
    say "edge source: a clip made from $(basename "$photo")"
    extra_vars=(-e "{\"facehub_edge_detector_source\": \"$work/clip/clip.avi\", \"facehub_edge_host_files\": [\"$work/clip/clip.avi\"], \"facehub_edge_extra_env\": {\"FACEHUB_DETECTOR_LOOP\": \"true\"}}")
fi
# No YuNet download here (CI reaches package registries only): the image is built without it
# too, so the detector's "auto" backend runs Haar, as on any box without the model.
"$venv/bin/ansible-playbook" -i "$work/inventory.yml" "$root/ansible/edge.yml" --tags facehub_edge \
    -e facehub_edge_yunet_fetch=false "${extra_vars[@]}" > "$work/edge-play.log" 2>&1 ||
    { tail -40 "$work/edge-play.log"; fail "the edge play"; }
check "the edge play rendered the manifests" test -s "$work/manifests/facehub-30-edge.yaml"
"$venv/bin/python" "$root/containers/ci/podman_play.py" "$work/manifests" "$work/edge-play.yaml" "$work/secrets" |
    sed 's/^/    /'
for secret in "$work"/secrets/*; do
    podman secret create "$(basename "$secret")" "$secret" >/dev/null
done
podman kube play --network host "$work/edge-play.yaml" > "$work/kube-play.log" 2>&1 ||
    { cat "$work/kube-play.log"; fail "podman kube play"; }
say "edge pods started in $(( $(date +%s) - t0 ))s: $(podman pod ps --format '{{.Name}}' | tr '\n' ' ')"
edge=$(podman ps --format '{{.Names}}' | grep -E '^facehub-edge-pod-[0-9]+-facehub$')
broker=$(podman ps --format '{{.Names}}' | grep -E '^facehub-mosquitto-pod-[0-9]+-mosquitto$')
edge_user=$(podman inspect "$edge" --format '{{.Config.User}} read-only={{.HostConfig.ReadonlyRootfs}}')
check "the edge pod runs as user 10001 with a read-only root ($edge_user)" \
    grep -Eq '^10001(:10001)? read-only=true$' <<<"$edge_user"
check "the probes became the container's health check (facehub health)" \
    grep -q "facehub health" <<<"$(podman inspect "$edge" --format '{{.Config.Healthcheck.Test}}')"
poll "the edge broker ($broker) on 127.0.0.1:$edge_port" 60 \
    "$venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $edge_port), 1)" ||
    fail "the edge broker never listened"
poll "the edge pod reports healthy" 120 podman healthcheck run "$edge" ||
    fail "the edge pod never became healthy: $(podman exec "$edge" facehub health 2>&1)"
poll "the edge pod's /metrics on port $edge_metrics_port" 30 scrape "$edge_metrics_port" ||
    fail "the edge pod never served /metrics on port $edge_metrics_port"

# 5. A face detected at the edge, stored by the containerised saver.
t0=$(date +%s)
poll "a face stored by the saver" 180 sh -c "find '$work/faces' -name '*.jpg' | grep -q ." ||
    fail "no face stored after 180s; edge: $(podman exec "$edge" facehub health --json 2>&1 | tail -c 1500)"
stored=$(find "$work/faces" -name '*.jpg' | head -1)
say "first face stored $(( $(date +%s) - t0 ))s after the edge was healthy: ${stored#"$work"/faces/}"
check "the stored face is under the device's folder" grep -q "^$work/faces/$device/" <<<"$stored"
check "the stored face is a JPEG" test "$(head -c 3 "$stored" | od -An -tx1 | tr -d ' ')" = ffd8ff
check "the saver is still healthy" podman exec facehub-saver facehub health
say "faces stored: $(find "$work/faces" -name '*.jpg' | wc -l); image build ${build_seconds}s"

# 6. The edge fleet on one cluster: the role's DaemonSet layout for two camera nodes (both this
#    machine), played as the pod of one of them. The first edge pods are done with: stopped, as
#    their detector would keep a CPU busy.
for pod in $(podman pod ps --format '{{.Name}}' | grep -E '^facehub-(edge|mosquitto)-pod-[0-9]+$'); do
    podman pod rm -f -t 5 "$pod" >/dev/null
done
t0=$(date +%s)
{ local_inventory; cat <<EOF
    edge:
      vars:
        facehub_edge_k3s_layout: daemonset
        facehub_edge_fleet_server: $fleet_server
        facehub_edge_device_id: "{{ inventory_hostname }}"
        facehub_edge_fleet_host_dir: $work/fleet-node
        facehub_edge_manifests_dir: $work/fleet-manifests/{{ inventory_hostname }}
        facehub_edge_wait: false
        facehub_edge_image: $image
        facehub_edge_image_pull_policy: Never
        facehub_edge_mosquitto_image: localhost/facehub-ci-mosquitto:latest
        facehub_edge_mqtt_port: $fleet_port
        facehub_edge_cloud_host: 127.0.0.1
        facehub_edge_cloud_port: $cloud_port
        facehub_edge_cloud_ca_file: $work/fetched/ca.crt
        facehub_edge_camera_device: ""
        facehub_edge_metrics_port: $fleet_metrics_port
      hosts:
        $fleet_server:
          facehub_edge_cloud_password: "$fleet_server_password"
        $fleet_node:
          facehub_edge_cloud_password: "$fleet_node_password"
EOF
} > "$work/fleet-inventory.yml"
chmod 0600 "$work/fleet-inventory.yml"
"$venv/bin/ansible-playbook" -i "$work/fleet-inventory.yml" "$root/ansible/edge.yml" --tags facehub_edge \
    -e facehub_edge_yunet_fetch=false "${extra_vars[@]}" > "$work/fleet-play.log" 2>&1 ||
    { tail -40 "$work/fleet-play.log"; fail "the fleet's edge play"; }
check "the fleet play wrote the DaemonSet and the passwords' Secret on the server only" \
    test -s "$work/fleet-manifests/$fleet_server/facehub-30-edge-fleet.yaml" \
    -a -s "$work/fleet-manifests/$fleet_server/facehub-05-fleet-secret.yaml" \
    -a ! -e "$work/fleet-manifests/$fleet_node"
# podman 4.3 has no DaemonSet, spec.nodeName or $(VAR) expansion: podman_play.py --node makes
# the pod the DaemonSet would put on $fleet_node, resolving them as the kubelet would.
"$venv/bin/python" "$root/containers/ci/podman_play.py" "$work/fleet-manifests/$fleet_server" \
    "$work/fleet-play.yaml" "$work/fleet-secrets" --node "$fleet_node" | sed 's/^/    /'
find "$work/fleet-secrets" -maxdepth 1 -type f | while read -r secret; do
    podman secret create "$(basename "$secret")" "$secret" >/dev/null
done
podman kube play --network host "$work/fleet-play.yaml" > "$work/fleet-kube-play.log" 2>&1 ||
    { cat "$work/fleet-kube-play.log"; fail "podman kube play of the fleet's pod"; }
say "the fleet's pod on $fleet_node started in $(( $(date +%s) - t0 ))s"
camera="facehub-edge-$fleet_node-facehub"
fleet_config=$(podman exec "$camera" facehub config check) || fail "facehub config check in the fleet's pod"
setting() {  # setting KEY: one value of the pod's effective configuration (facehub config check)
    "$venv/bin/python" -c "import json, sys; value = json.loads(sys.stdin.read())
for key in sys.argv[1].split('.'):
    value = value[key]
print(value)" "$1" <<<"$fleet_config"
}
check "the fleet pod's device id is its node's name ($(setting device_id))" test "$(setting device_id)" = "$fleet_node"
check "it logs in to the cloud as its node ($(setting cloud.username))" test "$(setting cloud.username)" = "$fleet_node"
check "its password is read from the file named after its node ($(setting cloud.password_file))" \
    test "$(setting cloud.password_file)" = "/etc/facehub/passwords/$fleet_node" \
    -a "$(setting cloud.password)" = "********" \
    -a -z "$(podman exec "$camera" printenv FACEHUB_CLOUD_PASSWORD)"
poll "the fleet pod reports healthy" 120 podman healthcheck run "$camera" ||
    fail "the fleet pod never became healthy: $(podman exec "$camera" facehub health 2>&1)"
# Only the node's own password opens its account on the cloud broker: a stored face proves it.
poll "a face of $fleet_node stored by the saver" 180 sh -c "find '$work/faces/$fleet_node' -name '*.jpg' | grep -q ." ||
    fail "no face of $fleet_node stored after 180s; its pod: $(podman exec "$camera" facehub health --json 2>&1 | tail -c 1500)"
check "the node's spool is on the node (hostPath $work/fleet-node/spool)" test -s "$work/fleet-node/spool/spool.db"
say "faces of $fleet_node stored: $(find "$work/faces/$fleet_node" -name '*.jpg' | wc -l)"
podman pod rm -f -t 5 "facehub-edge-$fleet_node" >/dev/null

# 7. The cloud savers of containers/k8s-cloud/ as written: their Deployment (two replicas, one
#    saver each, each pod its own client id) played by podman against a broker and an S3 made
#    here. The broker cluster's place is taken by a mosquitto with TLS (the cloud play's CA and
#    certificate) and a password for "saver"; S3's by moto's server. The Secret and the CA's
#    ConfigMap, which the manifest leaves to be made out of band, are made here too.
t0=$(date +%s)
s3_port=$(free_port)
savers_port=$(free_port)
savers_password=$(openssl rand -hex 16)
publisher_password=$(openssl rand -hex 16)
"$project_python" -m moto.server -H 127.0.0.1 -p "$s3_port" > "$work/moto.log" 2>&1 &
moto_pid=$!
poll "moto's S3 on 127.0.0.1:$s3_port" 60 "$venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $s3_port), 1)" ||
    fail "moto's S3 never listened"
"$project_python" "$root/containers/ci/savers_check.py" bucket "http://127.0.0.1:$s3_port" facehub-faces
broker_dir=$work/savers-broker
mkdir -p "$broker_dir"
cp "$work/cloud/mosquitto/tls/ca.crt" "$work/cloud/mosquitto/tls/server.crt" "$work/cloud/mosquitto/tls/server.key" "$broker_dir/"
cat > "$broker_dir/mosquitto.conf" <<EOF
listener $savers_port 127.0.0.1
cafile /mosquitto/config/ca.crt
certfile /mosquitto/config/server.crt
keyfile /mosquitto/config/server.key
allow_anonymous false
password_file /mosquitto/config/passwords
EOF
touch "$broker_dir/passwords"
chown -R 1883:1883 "$broker_dir" && chmod 0700 "$broker_dir" && chmod 0600 "$broker_dir"/*
for account in "saver $savers_password" "publisher $publisher_password"; do
    # shellcheck disable=SC2086  # user name and password, two words
    podman run --rm --no-healthcheck -v "$broker_dir:/mosquitto/config" --entrypoint mosquitto_passwd \
        localhost/facehub-ci-mosquitto:latest -b /mosquitto/config/passwords $account
done
podman run -d --name facehub-savers-broker --no-healthcheck --network host -v "$broker_dir:/mosquitto/config:ro" \
    localhost/facehub-ci-mosquitto:latest >/dev/null
poll "the savers' broker on 127.0.0.1:$savers_port" 30 \
    "$venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $savers_port), 1)" ||
    fail "the savers' broker never listened"
mkdir -p "$work/cloud-k8s"
cp "$root"/containers/k8s-cloud/*.yaml "$work/cloud-k8s/"
ca_json=$("$venv/bin/python" -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read()))' "$work/fetched/ca.crt")
cat > "$work/cloud-k8s/out-of-band.yaml" <<EOF
apiVersion: v1
kind: Secret
metadata: {name: facehub-saver-secrets, namespace: facehub-cloud}
stringData: {mqtt-password: "$savers_password", s3-access-key-id: testing, s3-secret-access-key: testing}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: facehub-broker-ca, namespace: facehub-cloud}
data: {ca.crt: $ca_json}
EOF
# The settings that point at the broker cluster, the bucket and the registry point here instead.
# /metrics is off: the two replicas share the host's network, where one port cannot serve both.
manifest_image=$(awk '$1 == "image:" {print $2; exit}' "$root/containers/k8s-cloud/facehub-cloud-savers.yaml")
"$venv/bin/python" "$root/containers/ci/podman_play.py" "$work/cloud-k8s" "$work/savers-play.yaml" \
    "$work/savers-secrets" --image "$manifest_image=$image" \
    --set "facehub-saver-config:FACEHUB_CLOUD_HOST=127.0.0.1" \
    --set "facehub-saver-config:FACEHUB_CLOUD_PORT=$savers_port" \
    --set "facehub-saver-config:FACEHUB_SAVER_ENDPOINT_URL=http://127.0.0.1:$s3_port" \
    --set "facehub-saver-config:FACEHUB_SAVER_REGION=us-east-1" \
    --set "facehub-saver-config:FACEHUB_METRICS_PORT=0" | sed 's/^/    /'
find "$work/savers-secrets" -maxdepth 1 -type f | while read -r secret; do
    podman secret create "$(basename "$secret")" "$secret" >/dev/null
done
podman kube play --network host "$work/savers-play.yaml" > "$work/savers-kube-play.log" 2>&1 ||
    { cat "$work/savers-kube-play.log"; fail "podman kube play of the cloud savers"; }
savers=$(podman ps --format '{{.Names}}' | grep -E '^facehub-saver-pod-[0-9]+-saver$' | sort)
say "the cloud savers started in $(( $(date +%s) - t0 ))s: $(echo "$savers" | tr '\n' ' ')"
check "the Deployment's two replicas run" test "$(echo "$savers" | wc -l)" = 2
for saver in $savers; do
    poll "$saver is healthy" 120 podman healthcheck run "$saver" ||
        fail "$saver never became healthy: $(podman logs --tail 20 "$saver" 2>&1)"
done
faces_sent=24
"$project_python" "$root/containers/ci/savers_check.py" publish "$savers_port" "$work/fetched/ca.crt" \
    publisher <(echo "$publisher_password") ci-k8s-cloud "$faces_sent" || fail "publishing to the savers' broker"
count_stored() { "$project_python" "$root/containers/ci/savers_check.py" count "http://127.0.0.1:$s3_port" facehub-faces faces/ci-k8s-cloud/; }
all_stored() { [ "$(count_stored)" -ge "$faces_sent" ]; }
poll "$faces_sent faces in the bucket" 120 all_stored || true  # the count below says how many
stored_s3=$(count_stored)
check "the savers stored each of the $faces_sent faces in S3, once ($stored_s3 objects)" test "$stored_s3" = "$faces_sent"

# 8. A pristine machine: the same minbase root in a chroot, `.ci/run --install-only` there,
#    then every tool looked for. Its last line says ok or names what is missing. The
#    containers are done with: stopped first, as the edge detector would keep a CPU busy.
# (their complaints about systemd health check timers are noise: there is no systemd here)
podman pod rm -f -a -t 5 >/dev/null 2>&1 || true
podman rm -f -a -t 5 >/dev/null 2>&1 || true
t0=$(date +%s)
bash "$root/containers/ci/check-install.sh" "$minbase_tar" > "$work/check-install.log" 2>&1 &&
    install_rc=0 || install_rc=$?
[ "$install_rc" = 0 ] || tail -40 "$work/check-install.log" | sed 's/^/    /'
say "install check ran in $(( $(date +%s) - t0 ))s"
check "$(tail -1 "$work/check-install.log" | sed -E 's/^check-install: (ok: |FAILED: )?//')" test "$install_rc" = 0
say "total $(( $(date +%s) - started ))s"
