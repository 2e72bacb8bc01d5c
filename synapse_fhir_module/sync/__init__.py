"""FHIR drives Matrix: a ``CareTeam`` becomes a space, a ``CommunicationRequest`` a room;
membership and power levels follow FHIR; ``Communication``s from other systems are relayed
into their rooms. Changes come from the notify queue, subscriptions and periodic sweeps.

May import: ``fhir``, ``mapping``, ``identity``, ``enforcement``, ``storage``,
``service_user``, ``config``.
"""
