#!/bin/sh
# Writes Mosquitto's password file from the environment (no password is ever stored in the
# repository): one account each for pumpwatch ingest, the alerts/notify services, the broker's
# health check and the development device (named by its pump's serial: the ACL lets it speak
# for that pump only). Run by the compose service `mosquitto-passwd`, and by the tests.
# Usage: make-passwd.sh [FILE]   (default /mosquitto/auth/passwd)
set -eu
file="${1:-/mosquitto/auth/passwd}"
: "${MQTT_INGEST_PASSWORD:?set MQTT_INGEST_PASSWORD}"
: "${MQTT_ALERTS_PASSWORD:?set MQTT_ALERTS_PASSWORD}"
: "${MQTT_HEALTH_PASSWORD:?set MQTT_HEALTH_PASSWORD}"
: "${MQTT_DEVICE_PASSWORD:?set MQTT_DEVICE_PASSWORD}"
device="${MQTT_DEVICE_SERIAL:-NGPDEV0001}"

mkdir -p "$(dirname "$file")"
umask 077
tmp="$file.new"
rm -f "$tmp"
: > "$tmp"
mosquitto_passwd -b "$tmp" pumpwatch-ingest "$MQTT_INGEST_PASSWORD"
mosquitto_passwd -b "$tmp" pumpwatch-alerts "$MQTT_ALERTS_PASSWORD"
mosquitto_passwd -b "$tmp" pumpwatch-health "$MQTT_HEALTH_PASSWORD"
mosquitto_passwd -b "$tmp" "$device" "$MQTT_DEVICE_PASSWORD"
# The broker reads it as the mosquitto user once it has dropped root.
chown mosquitto:mosquitto "$tmp" 2>/dev/null || true
chmod 0600 "$tmp"
mv "$tmp" "$file"
echo "wrote $file: pumpwatch-ingest, pumpwatch-alerts, pumpwatch-health, $device"
