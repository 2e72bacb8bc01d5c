"""The HTTP resources the module adds to Synapse: ``/notify`` (the HAPI shim and FHIR
Subscriptions), ``/health``, and the admin API for dead letters.

May import every other part; nothing imports it but ``module``.
"""
