"""The FHIR side, read as the module needs it: the conventions every part shares
(``conventions``: identifier systems, the origin tag, person types, references), the REST
client and its errors, and the pure readings of care data — persons and their Matrix
accounts, care teams and their periods, the teams a thread (CommunicationRequest) names —
with the caches in front of them.

May import: ``config``, ``http_exchange``. Nothing else of the module: everything else
builds on this.
"""
