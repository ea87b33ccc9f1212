#!/bin/sh
# Development TLS certificates for the broker's 8883 listener: a throw-away CA and a server
# certificate it signs, valid for the compose host name `mosquitto`, localhost and 127.0.0.1
# (and any names given after the directory). Never commit the output: the default directory,
# deploy/mosquitto/certs/, is in .gitignore. Production brokers get certificates from a real CA
# into the same file names (ca.crt, server.crt, server.key).
# Usage: gen-dev-certs.sh [DIR [EXTRA_DNS_NAME ...]]
set -eu
dir="${1:-$(dirname "$0")/certs}"
[ "$#" -gt 0 ] && shift
mkdir -p "$dir"
cd "$dir"

san="DNS:mosquitto,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    san="$san,DNS:$name"
done

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 \
    -subj "/CN=pumpwatch development CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 \
    -subj "/CN=mosquitto" \
    -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 0600 ca.key
# The broker in its container runs as another user than whoever made these: development only.
chmod 0644 server.key server.crt ca.crt
echo "wrote $(pwd): ca.crt (give to clients), server.crt, server.key; ca.key (keep or delete)"
