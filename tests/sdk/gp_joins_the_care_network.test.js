// Journey 1: a GP is added to a patient's care team in FHIR and takes part in its thread
// from Element. Nobody invites her by hand: the FHIR write does.
//
// Run by tests/integration/test_sdk_journeys.py (which starts Synapse with the module and
// HAPI, and registers the accounts); see docs/clinician-journeys.md.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import * as sdk from "matrix-js-sdk";

import {
  fhirPut,
  invitedRoom,
  matrixTelecom,
  messagesOf,
  recordedCommunication,
  ref,
  signIn,
  stack,
  waitFor,
} from "./journey.js";

const STEP = { timeout: 120_000 };
const CARE_TEAM_STATE = "org.synapse_fhir.care_team";
const THREAD_STATE = "org.synapse_fhir.thread";
const GP_ROLE = { coding: [{ system: "http://snomed.info/sct", code: "62247001" }] };

const { gp: gpAccount, nurse: nurseAccount } = stack.accounts;
const id = (name) => `${name}-${stack.tag}`;
const teamRef = `CareTeam/${id("team")}`;
const threadRef = `CommunicationRequest/${id("wound")}`;
const OPENING = "Please check the wound on the left leg on Monday";

const careTeam = (...participants) => ({
  resourceType: "CareTeam",
  id: id("team"),
  status: "active",
  name: "Home care team",
  subject: ref("Patient", id("patient")),
  participant: participants,
});
const nurseParticipant = { member: ref("Practitioner", id("nurse")) };
const gpParticipant = { member: ref("Practitioner", id("gp")), role: [GP_ROLE] };

let gp;
let nurse;
let space;
let threadRoom;
let nurseQuestion;
let nurseQuestionRecord;
let reply;

before(async () => {
  // The care record as the home-care organisation keeps it: a patient, a district nurse
  // and the GP (each with their Matrix account in `telecom`), a care team without the GP.
  await fhirPut({ resourceType: "Patient", id: id("patient"), active: true });
  for (const [name, account] of [
    ["nurse", nurseAccount],
    ["gp", gpAccount],
  ]) {
    await fhirPut({
      resourceType: "Practitioner",
      id: id(name),
      active: true,
      telecom: matrixTelecom(account.userId),
    });
  }
  await fhirPut(careTeam(nurseParticipant));
  // Both have Element open.
  [gp, nurse] = await Promise.all([signIn("gp"), signIn("nurse")]);

  // The nurse is in the team's space; a thread about the wound is opened in FHIR, and she
  // asks a question in its room.
  const nurseSpace = await invitedRoom(nurse, CARE_TEAM_STATE, teamRef);
  await nurse.joinRoom(nurseSpace.roomId);
  await fhirPut({
    resourceType: "CommunicationRequest",
    id: id("wound"),
    status: "active",
    subject: ref("Patient", id("patient")),
    recipient: [ref("CareTeam", id("team"))],
    category: [{ text: "Wound care" }],
    payload: [{ contentString: OPENING }],
  });
  const nurseRoom = await invitedRoom(nurse, THREAD_STATE, threadRef);
  await nurse.joinRoom(nurseRoom.roomId);
  nurseQuestion = (
    await nurse.sendMessage(nurseRoom.roomId, {
      msgtype: "m.text",
      body: "The skin around the wound is red since yesterday. Antibiotics?",
    })
  ).event_id;
  nurseQuestionRecord = await recordedCommunication(nurseQuestion, "the nurse's question in FHIR");
});

after(() => {
  gp?.stopClient();
  nurse?.stopClient();
});

test(
  "the GP is added to the care team in FHIR and Element shows an invitation to its space",
  STEP,
  async () => {
    await fhirPut(careTeam(nurseParticipant, gpParticipant));

    const invite = await invitedRoom(gp, CARE_TEAM_STATE, teamRef);
    space = invite.roomId;
    // A space (Element lists it in the space bar), named after the team, never the patient.
    assert.equal(invite.isSpaceRoom(), true);
    assert.equal(invite.getType(), sdk.RoomType.Space);
    assert.equal(invite.name, "Home care team");
    // Invited by the care network's service account, not by a colleague.
    const myInvite = invite.currentState.getStateEvents(sdk.EventType.RoomMember, gpAccount.userId);
    assert.equal(myInvite.getSender(), stack.serviceUserId);
  },
);

test("before joining, the space shows its thread rooms (space hierarchy)", STEP, async () => {
  // What Element's space home lists: the space and the rooms it holds that she may enter.
  const hierarchy = await waitFor("the thread room in the space's hierarchy", async () => {
    const { rooms } = await gp.getRoomHierarchy(space);
    return rooms.some((room) => room.room_id !== space) ? rooms : null;
  });
  const [top, ...children] = hierarchy;
  assert.equal(top.room_id, space);
  assert.equal(top.room_type, sdk.RoomType.Space);
  assert.equal(children.length, 1);
  threadRoom = children[0].room_id;
  // Named from the request's category (its payload can name the patient).
  assert.equal(children[0].name, "Wound care");
  assert.equal(children[0].room_type, undefined); // a room for talking, not another space
  assert.deepEqual(
    top.children_state.map((child) => child.state_key),
    [threadRoom],
  );
});

test("she joins the space and the thread room", STEP, async () => {
  await invitedRoom(gp, THREAD_STATE, threadRef);
  await gp.joinRoom(space);
  await gp.joinRoom(threadRoom);
  await waitFor("the GP joined both", () =>
    [space, threadRoom].every(
      (roomId) => gp.getRoom(roomId)?.getMyMembership() === sdk.KnownMembership.Join,
    ),
  );
});

test(
  "she reads the thread: the request's words first, then the nurse's question",
  STEP,
  async () => {
    const messages = await waitFor("the thread's two messages", async () => {
      const found = await messagesOf(gp, threadRoom);
      return found.length >= 2 ? found : null;
    });
    const [opening, question] = messages;
    // The CommunicationRequest's payload, posted by the service account in the care
    // network's own voice (no person's name on it).
    assert.equal(opening.getSender(), stack.serviceUserId);
    assert.equal(opening.getContent().body, OPENING);
    assert.equal(opening.getContent()["com.beeper.per_message_profile"], undefined);
    assert.equal(question.getId(), nurseQuestion);
    assert.equal(question.getSender(), nurseAccount.userId);
  },
);

test(
  "her reply to the nurse lands in FHIR as a Communication in response to the nurse's",
  STEP,
  async () => {
    reply = (
      await gp.sendMessage(threadRoom, {
        msgtype: "m.text",
        body: "Start amoxicillin 500 mg three times a day",
        "m.relates_to": { "m.in_reply_to": { event_id: nurseQuestion } },
      })
    ).event_id;
    const recorded = await recordedCommunication(reply, "the GP's reply in FHIR");
    assert.deepEqual(recorded.inResponseTo, [
      { reference: `Communication/${nurseQuestionRecord.id}`, type: "Communication" },
    ]);
    assert.deepEqual(recorded.sender, ref("Practitioner", id("gp")));
    assert.deepEqual(recorded.partOf, [ref("CommunicationRequest", id("wound"))]);
    assert.deepEqual(recorded.recipient, [ref("CareTeam", id("team"))]);
    assert.equal(recorded.subject.reference, `Patient/${id("patient")}`);
    assert.deepEqual(recorded.payload, [
      { contentString: "Start amoxicillin 500 mg three times a day" },
    ]);
  },
);

test(
  "she corrects the dose (an edit): FHIR keeps one record with the corrected text",
  STEP,
  async () => {
    const corrected = "Start amoxicillin 750 mg three times a day";
    const before = await recordedCommunication(reply, "the reply in FHIR");
    await gp.sendMessage(threadRoom, {
      msgtype: "m.text",
      body: `* ${corrected}`,
      "m.new_content": { msgtype: "m.text", body: corrected },
      "m.relates_to": { rel_type: sdk.RelationType.Replace, event_id: reply },
    });
    // Element shows the corrected text in place (marked as edited)...
    await waitFor(
      "the edit shown in place",
      () => gp.getRoom(threadRoom).findEventById(reply)?.getContent().body === corrected,
    );
    // ...and the same Communication gets a new version: only the text changed.
    const after = await recordedCommunication(
      reply,
      "the edit as version 2 of the reply's Communication",
      (communication) => communication.meta.versionId === "2",
    );
    assert.deepEqual(after.payload, [{ contentString: corrected }]);
    for (const kept of ["id", "identifier", "sender", "sent", "partOf", "inResponseTo", "status"]) {
      assert.deepEqual(after[kept], before[kept], kept);
    }
  },
);

test(
  "she removes the message (a redaction): FHIR marks it entered-in-error, text gone",
  STEP,
  async () => {
    await gp.redactEvent(threadRoom, reply);
    await waitFor("the message shown as removed", () =>
      gp.getRoom(threadRoom).findEventById(reply)?.isRedacted(),
    );
    const withdrawn = await recordedCommunication(
      reply,
      "the reply's Communication withdrawn",
      (communication) => communication.status === "entered-in-error",
    );
    assert.equal(withdrawn.payload, undefined);
    assert.equal(withdrawn.meta.versionId, "3");
    // Still the reply it was, by the GP, in the thread: the record says a message was withdrawn.
    assert.deepEqual(withdrawn.sender, ref("Practitioner", id("gp")));
    assert.deepEqual(withdrawn.partOf, [ref("CommunicationRequest", id("wound"))]);
  },
);
