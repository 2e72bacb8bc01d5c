#!/bin/sh
# HAPI's own role and database beside Synapse's, in the same PostgreSQL. The postgres image runs
# this once, when its data volume is first initialised (then POSTGRES_USER, the superuser, and
# POSTGRES_DB exist); changing HAPI_POSTGRES_PASSWORD later changes nothing here.
set -eu
: "${HAPI_POSTGRES_PASSWORD:?HAPI_POSTGRES_PASSWORD is not set}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=hapi_password="$HAPI_POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE hapi LOGIN PASSWORD :'hapi_password';
CREATE DATABASE hapi OWNER hapi ENCODING 'UTF8' TEMPLATE template0;
SQL
