// What every journey needs: the stack pytest started (from environment variables), FHIR
// written and read over plain HTTP as an integrator would, Element's SDK logged in as a
// clinician, and waiting with a deadline (never sleeping to synchronise).

import * as sdk from "matrix-js-sdk";
import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";

// Generous: these journeys say what happens, not how fast (the benchmarks measure that).
const DEADLINE_MS = 60_000;

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run the journeys with pytest (test_sdk_journeys.py)`);
  }
  return value;
}

// The stack: Synapse with the module, the HAPI whose shim notifies it, the module's service
// user, the clinicians' accounts (name → {userId, accessToken}) and a tag unique to this run.
export const stack = {
  synapseUrl: required("SDK_SYNAPSE_URL"),
  fhirUrl: required("SDK_FHIR_URL"),
  serviceUserId: required("SDK_SERVICE_USER_ID"),
  accounts: JSON.parse(required("SDK_ACCOUNTS")),
  tag: required("SDK_TAG"),
};

// Polls `probe` until it returns something truthy (returned) or the deadline passes (then
// fails saying what never happened). A probe that throws is tried again.
export async function waitFor(what, probe, { timeoutMs = DEADLINE_MS, everyMs = 200 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastError;
  for (;;) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) {
      const cause = lastError ? ` (last error: ${lastError.message})` : "";
      throw new Error(`waited ${timeoutMs / 1000} s for ${what}${cause}`);
    }
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}

// --- FHIR, over HTTP -------------------------------------------------------------------

export async function fhirPut(resource) {
  const url = `${stack.fhirUrl}/${resource.resourceType}/${resource.id}`;
  const response = await fetch(url, {
    method: "PUT",
    headers: { "Content-Type": "application/fhir+json" },
    body: JSON.stringify(resource),
  });
  if (!response.ok) {
    throw new Error(`PUT ${resource.resourceType}/${resource.id}: HTTP ${response.status}`);
  }
  return response.json();
}

export async function fhirSearch(resourceType, params) {
  const query = new URLSearchParams(params);
  const response = await fetch(`${stack.fhirUrl}/${resourceType}?${query}`, {
    headers: { "Cache-Control": "no-cache" },
  });
  if (!response.ok) throw new Error(`search ${resourceType}: HTTP ${response.status}`);
  const bundle = await response.json();
  return (bundle.entry ?? []).map((entry) => entry.resource);
}

const EVENT_ID_SYSTEM = "https://matrix.org/event-id";

// The Communication the module recorded for a Matrix event, once `ready` holds for it.
export function recordedCommunication(eventId, what, ready = () => true) {
  return waitFor(what, async () => {
    const [communication] = await fhirSearch("Communication", {
      identifier: `${EVENT_ID_SYSTEM}|${eventId}`,
    });
    return communication && ready(communication) ? communication : null;
  });
}

// How FHIR names a Matrix account (the MSC2312 URI in a person's telecom).
export function matrixTelecom(userId) {
  return [{ system: "url", value: `matrix:u/${userId.slice(1)}` }];
}

export function ref(resourceType, id) {
  return { reference: `${resourceType}/${id}`, type: resourceType };
}

// --- Element's SDK -----------------------------------------------------------------------

// The SDK's own chatter stays out of the test report: it warns that Synapse lacks push rules
// it knows, and a client errs on state of rooms it was only invited to (for calls, unused
// here). What fails in a journey fails as a rejected call or an assertion.
sdkLogger.setLevel("error");
sdkLogger.getChild("[MatrixRTCSessionManager]").setLevel("silent");
const quiet = {
  trace() {},
  debug() {},
  info() {},
  warn() {},
  error() {},
  getChild() {
    return quiet;
  },
};

// A clinician's Element: logged in, synced (state PREPARED), without end-to-end
// encryption (care-team rooms are recorded and refuse it).
export async function signIn(name) {
  const { userId, accessToken } = stack.accounts[name];
  const client = sdk.createClient({
    baseUrl: stack.synapseUrl,
    accessToken,
    userId,
    logger: quiet,
  });
  const prepared = new Promise((resolve, reject) => {
    client.on(sdk.ClientEvent.Sync, (state, _previous, data) => {
      if (state === sdk.SyncState.Prepared) resolve();
      if (state === sdk.SyncState.Error) reject(data?.error ?? new Error("sync failed"));
    });
  });
  await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: true });
  await prepared;
  return client;
}

// The room the clinician is invited to whose invite binds it to `reference` (the
// module's state event, shown with the invite: which care team or thread it is for).
export function invitedRoom(client, stateType, reference) {
  return waitFor(`${client.getUserId()} invited to the room of ${stateType}`, () =>
    client
      .getRooms()
      .find(
        (room) =>
          room.getMyMembership() === sdk.KnownMembership.Invite &&
          room.currentState.getStateEvents(stateType, "")?.getContent().reference === reference,
      ),
  );
}

// The room's messages as the clinician scrolls up to its start (Element loads history the
// same way), oldest first.
export async function messagesOf(client, roomId) {
  const room = client.getRoom(roomId);
  for (let page = 0; page < 20 && room.oldState.paginationToken; page++) {
    await client.scrollback(room, 50);
  }
  return room
    .getLiveTimeline()
    .getEvents()
    .filter((event) => event.getType() === sdk.EventType.RoomMessage && !event.isRedacted());
}

// The MatrixError an SDK call rejects with (fails when it succeeds).
export async function refusal(call) {
  try {
    await call();
  } catch (error) {
    if (error instanceof sdk.MatrixError) return error;
    throw error;
  }
  throw new Error("the call succeeded; a refusal was expected");
}
