// Journey 2: the patient's neighbour has an account on the same server and a link to the
// care team's space, but is not in the care team. Element shows the module's reason.
//
// Run by tests/integration/test_sdk_journeys.py; see docs/clinician-journeys.md.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { fhirPut, invitedRoom, matrixTelecom, ref, refusal, signIn, stack } from "./journey.js";

const STEP = { timeout: 120_000 };
// The module's words (synapse_fhir_module/enforcement/denials.py), exactly.
const NOT_IN_CARE_TEAM =
  "This room belongs to a care team, and this person is not a current member of it " +
  "in the care record.";

const { gp: gpAccount, neighbour: neighbourAccount } = stack.accounts;
const id = (name) => `${name}-${stack.tag}`;

let gp;
let neighbour;
let space;

before(async () => {
  // In the care record the neighbour is known (a RelatedPerson of the patient, with his
  // Matrix account) but is no participant of the care team; the GP is.
  await fhirPut({ resourceType: "Patient", id: id("patient"), active: true });
  await fhirPut({
    resourceType: "Practitioner",
    id: id("gp"),
    active: true,
    telecom: matrixTelecom(gpAccount.userId),
  });
  await fhirPut({
    resourceType: "RelatedPerson",
    id: id("neighbour"),
    active: true,
    patient: ref("Patient", id("patient")),
    relationship: [
      { coding: [{ system: "http://terminology.hl7.org/CodeSystem/v3-RoleCode", code: "NBOR" }] },
    ],
    telecom: matrixTelecom(neighbourAccount.userId),
  });
  [gp, neighbour] = await Promise.all([signIn("gp"), signIn("neighbour")]);
  await fhirPut({
    resourceType: "CareTeam",
    id: id("team"),
    status: "active",
    name: "Home care team",
    subject: ref("Patient", id("patient")),
    participant: [{ member: ref("Practitioner", id("gp")) }],
  });
  // The GP is invited and joins; the neighbour learns the space's address.
  space = (await invitedRoom(gp, "org.synapse_fhir.care_team", `CareTeam/${id("team")}`)).roomId;
  await gp.joinRoom(space);
});

after(() => {
  gp?.stopClient();
  neighbour?.stopClient();
});

test("the neighbour tries to join and Element shows why not", STEP, async () => {
  const error = await refusal(() => neighbour.joinRoom(space));
  assert.equal(error.httpStatus, 403);
  assert.equal(error.errcode, "M_FORBIDDEN");
  // The machine-readable rule, for clients and support desks...
  assert.equal(error.data["org.synapse_fhir.reason"], "not_in_care_team");
  // ...and the sentence Element shows: the rule, in words, naming no patient.
  assert.equal(error.data.error, NOT_IN_CARE_TEAM);
  assert.equal(neighbour.getRoom(space)?.getMyMembership(), undefined);
});

test("the GP cannot bring the neighbour in either: the care record decides", STEP, async () => {
  const error = await refusal(() => gp.invite(space, neighbourAccount.userId));
  assert.equal(error.errcode, "M_FORBIDDEN");
  assert.equal(error.data["org.synapse_fhir.reason"], "not_in_care_team");
  assert.equal(error.data.error, NOT_IN_CARE_TEAM);
});

test("the neighbour cannot see which rooms the space holds", STEP, async () => {
  const error = await refusal(() => neighbour.getRoomHierarchy(space));
  assert.equal(error.httpStatus, 403);
  assert.equal(error.errcode, "M_FORBIDDEN");
});
