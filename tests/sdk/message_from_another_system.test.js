// Journey 3: a district nurse writes in another system (her organisation's care record),
// which stores a Communication in FHIR. The GP reads it in Element under the nurse's name,
// and answers it there.
//
// Run by tests/integration/test_sdk_journeys.py; see docs/clinician-journeys.md.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import * as sdk from "matrix-js-sdk";

import {
  fhirPut,
  fhirSearch,
  invitedRoom,
  matrixTelecom,
  recordedCommunication,
  ref,
  signIn,
  stack,
  waitFor,
} from "./journey.js";

const STEP = { timeout: 120_000 };
const PROFILE = "com.beeper.per_message_profile";
const TEXT = "Photo of the wound taken: less red than yesterday";

const { gp: gpAccount } = stack.accounts;
const id = (name) => `${name}-${stack.tag}`;

let gp;
let threadRoom;
let relayed;

before(async () => {
  // The district nurse has no Matrix account: she is only in FHIR, with her name.
  await fhirPut({ resourceType: "Patient", id: id("patient"), active: true });
  await fhirPut({
    resourceType: "Practitioner",
    id: id("gp"),
    active: true,
    telecom: matrixTelecom(gpAccount.userId),
  });
  await fhirPut({
    resourceType: "Practitioner",
    id: id("nurse"),
    active: true,
    name: [{ given: ["Bram"], family: "de Vries" }],
  });
  gp = await signIn("gp");
  await fhirPut({
    resourceType: "CareTeam",
    id: id("team"),
    status: "active",
    name: "Home care team",
    subject: ref("Patient", id("patient")),
    participant: [
      { member: ref("Practitioner", id("gp")) },
      { member: ref("Practitioner", id("nurse")) },
    ],
  });
  const space = await invitedRoom(gp, "org.synapse_fhir.care_team", `CareTeam/${id("team")}`);
  await gp.joinRoom(space.roomId);
  await fhirPut({
    resourceType: "CommunicationRequest",
    id: id("wound"),
    status: "active",
    subject: ref("Patient", id("patient")),
    recipient: [ref("CareTeam", id("team"))],
    category: [{ text: "Wound care" }],
  });
  threadRoom = (
    await invitedRoom(gp, "org.synapse_fhir.thread", `CommunicationRequest/${id("wound")}`)
  ).roomId;
  await gp.joinRoom(threadRoom);
});

after(() => gp?.stopClient());

test(
  "the other system's Communication appears in the room under the nurse's name",
  STEP,
  async () => {
    // Written to FHIR by the other system (no Matrix involved).
    await fhirPut({
      resourceType: "Communication",
      id: id("photo"),
      status: "completed",
      partOf: [ref("CommunicationRequest", id("wound"))],
      sender: ref("Practitioner", id("nurse")),
      payload: [{ contentString: TEXT }],
    });
    // Element's timeline gets it live (no reload).
    relayed = await waitFor("the relayed message in the GP's timeline", () =>
      gp
        .getRoom(threadRoom)
        .getLiveTimeline()
        .getEvents()
        .find((event) => event.getType() === sdk.EventType.RoomMessage),
    );
    const content = relayed.getContent();
    // Posted by the care network's service account, never through anyone's own account...
    assert.equal(relayed.getSender(), stack.serviceUserId);
    // ...and every client shows who wrote it, in front of the text...
    assert.equal(content.body, `Bram de Vries: ${TEXT}`);
    assert.equal(content.formatted_body, `<strong>Bram de Vries</strong>: ${TEXT}`);
    // ...while clients that show per-message profiles (MSC4144) show her name as the sender,
    // marked as coming from the care record (a FHIR name cannot pass for a Matrix user).
    assert.deepEqual(content[PROFILE], {
      id: `Practitioner/${id("nurse")}`,
      displayname: "Bram de Vries (care record)",
    });
  },
);

test(
  "the GP's reply is recorded in response to the other system's Communication itself",
  STEP,
  async () => {
    const reply = (
      await gp.sendMessage(threadRoom, {
        msgtype: "m.text",
        body: "Thanks, keep the dressing dry",
        "m.relates_to": { "m.in_reply_to": { event_id: relayed.getId() } },
      })
    ).event_id;
    const recorded = await recordedCommunication(reply, "the GP's reply in FHIR");
    assert.deepEqual(recorded.inResponseTo, [ref("Communication", id("photo"))]);
    assert.deepEqual(recorded.sender, ref("Practitioner", id("gp")));
    // The relayed message itself is not written back to FHIR as a second Communication.
    const echoes = await fhirSearch("Communication", {
      identifier: `https://matrix.org/event-id|${relayed.getId()}`,
    });
    assert.deepEqual(echoes, []);
  },
);
