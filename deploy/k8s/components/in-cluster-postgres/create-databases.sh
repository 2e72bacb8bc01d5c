#!/bin/sh
# Runs once, when the data directory is first initialised (the postgres image's
# /docker-entrypoint-initdb.d), as the superuser `postgres` (Secret postgres-superuser):
# Synapse's and HAPI's roles, each an ordinary role (no superuser, no CREATEDB, no
# CREATEROLE) that owns its own database. Synapse's database gets the collation Synapse
# requires (C), from template0.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v synapse_user="$SYNAPSE_DB_USER" -v synapse_password="$SYNAPSE_DB_PASSWORD" \
    -v synapse_db="$SYNAPSE_DB_NAME" \
    -v hapi_user="$HAPI_DB_USER" -v hapi_password="$HAPI_DB_PASSWORD" <<'SQL'
CREATE ROLE :"synapse_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
    PASSWORD :'synapse_password';
CREATE DATABASE :"synapse_db" OWNER :"synapse_user" TEMPLATE template0 ENCODING 'UTF8'
    LC_COLLATE 'C' LC_CTYPE 'C';
CREATE ROLE :"hapi_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'hapi_password';
CREATE DATABASE hapi OWNER :"hapi_user" ENCODING 'UTF8';
SQL
