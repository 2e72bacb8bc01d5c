#!/bin/sh
# Synapse's and HAPI's roles and databases, each role the owner of its database and neither a
# superuser (the superuser, POSTGRES_USER, is for administration only). The postgres image
# runs this once, when its data volume is first initialised; changing a password in .env later
# changes nothing here (ALTER ROLE ... PASSWORD does).
# C collation and ctype, from template0: Synapse requires them; HAPI gets the same.
set -eu
: "${SYNAPSE_POSTGRES_PASSWORD:?SYNAPSE_POSTGRES_PASSWORD is not set}"
: "${HAPI_POSTGRES_PASSWORD:?HAPI_POSTGRES_PASSWORD is not set}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
    --set=synapse_password="$SYNAPSE_POSTGRES_PASSWORD" \
    --set=hapi_password="$HAPI_POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE synapse LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'synapse_password';
CREATE DATABASE synapse OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'
    TEMPLATE template0;
CREATE ROLE hapi LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'hapi_password';
CREATE DATABASE hapi OWNER hapi ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
SQL
