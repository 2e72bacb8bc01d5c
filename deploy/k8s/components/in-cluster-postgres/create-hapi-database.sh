#!/bin/sh
# Runs once, when the data directory is first initialised (the postgres image's
# /docker-entrypoint-initdb.d): HAPI's role and database beside Synapse's, which the image
# made from POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v hapi_user="$HAPI_DB_USER" -v hapi_password="$HAPI_DB_PASSWORD" <<'SQL'
CREATE ROLE :"hapi_user" LOGIN PASSWORD :'hapi_password';
CREATE DATABASE hapi OWNER :"hapi_user" ENCODING 'UTF8';
SQL
