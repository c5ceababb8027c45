#!/usr/bin/env bash
# Make the cloud broker's files for containers/compose.yaml, the same files the
# mosquitto role makes: a CA and server certificate (openssl), one account per device
# and one per saver instance, each bound to its client id, with random passwords
# (dynamic-security.json for mosquitto's dynamic security plugin), and mosquitto.conf,
# all rendered from roles/mosquitto/templates.
#
#   [FACEHUB_SAVER_INSTANCES=2] containers/mosquitto/make-cloud-config.sh OUT_DIR SERVER_NAME DEVICE_ID...
#
# Run it again to change the accounts: every password is new then.
#
# Needs openssl and python3 with jinja2 and PyYAML. Prints the passwords once.
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 OUT_DIR SERVER_NAME DEVICE_ID..." >&2
    exit 2
fi
out=$1 server=$2
shift 2
for device in "$@"; do   # the same rule as the role: a user name, a client id and one topic level
    if ! [[ $device =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || [[ $device == facehub-saver-* ]]; then
        echo "device id '$device' cannot be a broker account: letters, digits, '.', '_', '-'" >&2
        exit 2
    fi
done
here=$(cd "$(dirname "$0")" && pwd)
config="$out/mosquitto"
private="$out/ca-private"   # the CA key stays out of the broker's folder
mkdir -p "$config/tls" "$private"
umask 077

if [ ! -f "$private/ca.key" ]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 \
        -keyout "$private/ca.key" -out "$config/tls/ca.crt" -days 3650 -subj "/CN=FaceHub MQTT CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$config/tls/server.key" -out "$config/tls/server.csr" -subj "/CN=$server"
openssl x509 -req -in "$config/tls/server.csr" -CA "$config/tls/ca.crt" -CAkey "$private/ca.key" \
    -CAserial "$private/ca.srl" -CAcreateserial -out "$config/tls/server.crt" -days 825 \
    -extfile <(printf 'subjectAltName=DNS:%s,DNS:mosquitto,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$server")
rm -f "$config/tls/server.csr"
# The web console's HTTPS certificate, signed by the same CA (compose.yaml mounts $out/console).
mkdir -p "$out/console"
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$out/console/console.key" -out "$out/console/console.csr" -subj "/CN=$server"
openssl x509 -req -in "$out/console/console.csr" -CA "$config/tls/ca.crt" -CAkey "$private/ca.key" \
    -CAserial "$private/ca.srl" -out "$out/console/console.crt" -days 825 \
    -extfile <(printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$server")
rm -f "$out/console/console.csr"

savers=${FACEHUB_SAVER_INSTANCES:-2}
case $savers in ''|*[!0-9]*) echo "FACEHUB_SAVER_INSTANCES must be a number" >&2; exit 2 ;; esac
saver_password=$(openssl rand -hex 24)
echo "savers (facehub-saver-1..$savers): $saver_password"
passwords="{"
for user in "$@"; do
    password=$(openssl rand -hex 24)
    passwords+="\"$user\": \"$password\","
    echo "$user: $password"
done
passwords="${passwords%,}}"
devices=$(printf '"%s",' "$@")
python3 "$here/../ci/render.py" mosquitto "$config" -t mosquitto.conf -t dynamic-security.json \
    -e "mosquitto_devices=[${devices%,}]" -e "mosquitto_passwords=$passwords" \
    -e "mosquitto_saver_password=$saver_password" -e "mosquitto_saver_instances=$savers" >/dev/null
rm -f "$config/passwd" "$config/acl"   # made by earlier versions, no longer read
chmod 0600 "$config/dynamic-security.json"
chmod 0644 "$config/tls/ca.crt" "$config/tls/server.crt" "$config/mosquitto.conf"
# The broker runs as uid 1883 (the eclipse-mosquitto image's user).
chmod 0644 "$out/console/console.crt"
if [ "$(id -u)" = 0 ]; then
    chown -R 1883:1883 "$config"
    chown -R 10001:10001 "$out/console"   # the FaceHub image's user (containers/Dockerfile)
fi
echo "broker files in $config; the savers' password goes into containers/.env as FACEHUB_SAVER_PASSWORD," \
    "and FACEHUB_SAVER_INSTANCES=$savers there too unless it is 2" >&2
