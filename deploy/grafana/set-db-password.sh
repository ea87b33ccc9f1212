#!/bin/sh
# Gives Grafana's read-only database role (created without login by migration 0007_grafana.sql)
# its login and password. Run after `pumpwatch migrate` by compose's grafana-db-role service, or
# by hand: PGHOST=… PGUSER=… PGPASSWORD=… PGDATABASE=… GRAFANA_DB_PASSWORD=… set-db-password.sh
# The password travels as a psql variable, quoted by psql, never spliced into SQL text.
set -eu
: "${GRAFANA_DB_PASSWORD:?set GRAFANA_DB_PASSWORD}"
echo "ALTER ROLE pumpwatch_grafana WITH LOGIN PASSWORD :'password';" |
    psql -X -q -v ON_ERROR_STOP=1 -v password="$GRAFANA_DB_PASSWORD"
echo "pumpwatch_grafana may log in"
