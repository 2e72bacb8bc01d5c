"""The operator console (``/_synapse/client/fhir/admin/``): a static page for server admins
and the JSON endpoints it reads — health and lags, care networks, recent refusals, dead
letters. Registered by ``web.wiring``; the page's files ship as package data (``static/``)."""
