"""Access: who may join, read and act in a care-team room, decided from FHIR ``CareTeam``
data (the third-party-rules, spam-checker and account-validity callbacks), the module's
record of which room belongs to which team (bindings), the power levels that guard what
callbacks cannot, registration, and the reasons given for a refusal.

May import: ``fhir``, ``identity``, ``storage``, ``callback_safety``, ``config``.
"""
