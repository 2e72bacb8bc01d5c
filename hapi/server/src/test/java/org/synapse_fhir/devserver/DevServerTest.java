package org.synapse_fhir.devserver;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import ca.uhn.fhir.rest.server.RestfulServer;
import org.springframework.boot.web.context.WebServerApplicationContext;
import org.springframework.context.ConfigurableApplicationContext;

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Boots the dev server once (random port, in-memory H2, shim pointed at a local receiver). */
class DevServerTest {

	private static final String NOTIFY_PATH = "/_synapse/client/fhir/notify";
	private static final String SECRET = "dev-server-test-secret";
	private static final Duration DEADLINE = Duration.ofSeconds(30);
	private static final ObjectMapper JSON = new ObjectMapper();
	private static final HttpClient HTTP = HttpClient.newHttpClient();

	private static HookReceiver receiver;
	private static ConfigurableApplicationContext server;
	private static String base;

	@BeforeAll
	static void boot() throws IOException {
		receiver = new HookReceiver();
		long start = System.nanoTime();
		server = DevServerApplication.start(
				"--server.port=0",
				"--spring.datasource.url=jdbc:h2:mem:devservertest;DB_CLOSE_DELAY=-1",
				"--SYNAPSE_NOTIFY_URL=" + receiver.baseUrl() + NOTIFY_PATH,
				"--SYNAPSE_NOTIFY_SECRET=" + SECRET);
		int port = ((WebServerApplicationContext) server).getWebServer().getPort();
		base = "http://127.0.0.1:" + port + "/fhir";
		System.out.printf("Dev server started in %d ms%n", (System.nanoTime() - start) / 1_000_000);
	}

	@AfterAll
	static void shutdown() {
		if (server != null) {
			server.close();
		}
		if (receiver != null) {
			receiver.close();
		}
	}

	@Test
	void servesR4CapabilityStatement() throws Exception {
		Response metadata = get("/metadata");

		assertEquals(200, metadata.status());
		assertEquals("CapabilityStatement", metadata.json().path("resourceType").asText());
		assertEquals("4.0.1", metadata.json().path("fhirVersion").asText());
	}

	@Test
	void clientAssignedIdCreatesOnPut() throws Exception {
		Response put = send("PUT", "/Patient/client-abc", "{\"resourceType\":\"Patient\",\"id\":\"client-abc\",\"active\":true}");
		Response read = get("/Patient/client-abc");

		assertEquals(201, put.status());
		assertEquals(200, read.status());
		assertEquals("client-abc", read.json().path("id").asText());
	}

	@Test
	void validateReportsErrorsOnlyForAnInvalidCommunication() throws Exception {
		Response invalid = send("POST", "/Communication/$validate", "{\"resourceType\":\"Communication\"}");
		Response valid = send("POST", "/Communication/$validate", """
				{"resourceType": "Communication", "status": "completed",
				 "identifier": [{"system": "https://matrix.org/event-id", "value": "$event1"}],
				 "sent": "2024-05-01T10:00:00Z",
				 "payload": [{"contentString": "hello"}]}""");

		assertEquals("OperationOutcome", invalid.json().path("resourceType").asText());
		assertTrue(severities(invalid).contains("error"), "expected an error for missing status: " + invalid.body());
		assertEquals("OperationOutcome", valid.json().path("resourceType").asText());
		assertFalse(severities(valid).contains("error"), "valid Communication reported errors: " + valid.body());
		assertFalse(severities(valid).contains("fatal"));
	}

	@Test
	void notifiesSynapseAfterARestCreate() throws Exception {
		Response created = send("POST", "/CareTeam", "{\"resourceType\":\"CareTeam\",\"status\":\"active\"}");
		assertEquals(201, created.status());
		String id = created.json().path("id").asText();

		HookReceiver.Request notification = receiver.await(isNotifyFor(id), DEADLINE, "notification for CareTeam/" + id);

		assertEquals("Bearer " + SECRET, notification.authorization());
		assertEquals("application/json", notification.contentType());
		assertEquals(
				Map.of("resourceType", "CareTeam", "id", id, "versionId", "1", "action", "create"),
				JSON.readValue(notification.body(), Map.class));
	}

	/**
	 * The official hapiproject/hapi image loads {@code hapi.fhir.custom-interceptor-classes} by
	 * class name, through the public no-arg constructor (settings from the environment), and
	 * registers the instance on the REST server. Do the same here and see it notify.
	 */
	@Test
	void loadsByClassNameAndNotifiesFromTheRestServerLikeTheOfficialImage() throws Exception {
		String imagePath = "/image-style" + NOTIFY_PATH;
		Object interceptor;
		System.setProperty("SYNAPSE_NOTIFY_URL", receiver.baseUrl() + imagePath);
		System.setProperty("SYNAPSE_NOTIFY_SECRET", "image-secret");
		System.setProperty("SYNAPSE_NOTIFY_TYPES", "RelatedPerson");
		try {
			interceptor = Class.forName("org.synapse_fhir.notify.SynapseNotifyInterceptor").getConstructor().newInstance();
		} finally {
			System.clearProperty("SYNAPSE_NOTIFY_URL");
			System.clearProperty("SYNAPSE_NOTIFY_SECRET");
			System.clearProperty("SYNAPSE_NOTIFY_TYPES");
		}
		RestfulServer restServer = server.getBean(RestfulServer.class);
		restServer.registerInterceptor(interceptor);
		try {
			String id = "rp-" + UUID.randomUUID();
			assertEquals(201, send("PUT", "/Patient/image-" + id, "{\"resourceType\":\"Patient\",\"id\":\"image-" + id + "\"}").status());
			assertEquals(201, send("PUT", "/RelatedPerson/" + id, "{\"resourceType\":\"RelatedPerson\",\"id\":\"" + id
					+ "\",\"patient\":{\"reference\":\"Patient/image-" + id + "\"}}").status());

			HookReceiver.Request notification = receiver.await(
					r -> r.path().equals(imagePath) && r.body().contains(id), DEADLINE, "notification via the REST-registered shim");
			assertEquals("Bearer image-secret", notification.authorization());
			assertEquals(Map.of("resourceType", "RelatedPerson", "id", id, "versionId", "1", "action", "create"),
					JSON.readValue(notification.body(), Map.class));
			// Its own type filter applies: the Patient went to the JPA-registered shim only.
			receiver.await(isNotifyFor("image-" + id), DEADLINE, "Patient notification via the JPA-registered shim");
			assertEquals(1, receiver.matching(r -> r.path().equals(imagePath)).size());
		} finally {
			restServer.unregisterInterceptor(interceptor);
			((org.synapse_fhir.notify.SynapseNotifyInterceptor) interceptor).shutdown();
		}
	}

	@Test
	void aRolledBackTransactionNotifiesNothing() throws Exception {
		String doomed = "rollback-" + UUID.randomUUID();
		Response failed = send("POST", "", """
				{"resourceType": "Bundle", "type": "transaction", "entry": [
				  {"resource": {"resourceType": "Patient", "id": "%s", "active": true},
				   "request": {"method": "PUT", "url": "Patient/%s"}},
				  {"resource": {"resourceType": "CareTeam", "status": "active",
				                "subject": {"reference": "Patient/does-not-exist"}},
				   "request": {"method": "POST", "url": "CareTeam"}}]}""".formatted(doomed, doomed));
		assertEquals(400, failed.status(), failed.body());
		assertEquals(404, get("/Patient/" + doomed).status(), "first entry should have been rolled back");

		// The shim sends in order: once a later write's notification is in, the doomed one would be too.
		String sentinel = "sentinel-" + UUID.randomUUID();
		send("PUT", "/Patient/" + sentinel, "{\"resourceType\":\"Patient\",\"id\":\"" + sentinel + "\"}");
		receiver.await(isNotifyFor(sentinel), DEADLINE, "notification for the sentinel");

		assertEquals(List.of(), receiver.matching(isNotifyFor(doomed)));
	}

	@Test
	void transactionConditionalCreateIsIdempotent() throws Exception {
		String eventId = "$" + UUID.randomUUID();
		String bundle = """
				{"resourceType": "Bundle", "type": "transaction", "entry": [
				  {"fullUrl": "urn:uuid:%s",
				   "resource": {"resourceType": "Communication", "status": "completed",
				                "identifier": [{"system": "https://matrix.org/event-id", "value": "%s"}]},
				   "request": {"method": "POST", "url": "Communication",
				               "ifNoneExist": "identifier=https://matrix.org/event-id|%s"}}]}"""
				.formatted(UUID.randomUUID(), eventId, eventId);

		JsonNode first = send("POST", "", bundle).json().path("entry").get(0).path("response");
		JsonNode second = send("POST", "", bundle).json().path("entry").get(0).path("response");
		JsonNode batch = send("POST", "", bundle.replace("\"transaction\"", "\"batch\"")).json().path("entry").get(0).path("response");

		assertEquals("201 Created", first.path("status").asText());
		assertEquals("200 OK", second.path("status").asText());
		assertEquals("200 OK", batch.path("status").asText());
		assertEquals(first.path("location").asText(), second.path("location").asText());
		assertEquals(first.path("location").asText(), batch.path("location").asText());
	}

	@Test
	void searchPagesWithNextLinksAndFiltersOnLastUpdated() throws Exception {
		String tag = "paging-" + UUID.randomUUID();
		StringBuilder entries = new StringBuilder();
		for (int i = 0; i < 120; i++) {
			entries.append(i == 0 ? "" : ",").append("""
					{"resource": {"resourceType": "Practitioner", "meta": {"tag": [{"system": "urn:test", "code": "%s"}]}},
					 "request": {"method": "POST", "url": "Practitioner"}}""".formatted(tag));
		}
		assertEquals(200, send("POST", "", "{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[" + entries + "]}").status());

		List<Integer> pageSizes = new ArrayList<>();
		String next = base + "/Practitioner?_tag=urn:test|" + tag + "&_count=50";
		while (next != null) {
			JsonNode page = getAbsolute(next).json();
			pageSizes.add(page.path("entry").size());
			next = null;
			for (JsonNode link : page.path("link")) {
				if ("next".equals(link.path("relation").asText())) {
					next = link.path("url").asText();
				}
			}
		}
		assertEquals(List.of(50, 50, 20), pageSizes);

		assertEquals(120, get("/Practitioner?_tag=urn:test|" + tag + "&_lastUpdated=gt2000-01-01&_summary=count").json().path("total").asInt());
		assertEquals(0, get("/Practitioner?_tag=urn:test|" + tag + "&_lastUpdated=gt2999-01-01&_summary=count").json().path("total").asInt());
	}

	@Test
	void aSearchRightAfterAWriteSeesIt() throws Exception {
		String search = "/CareTeam?_tag=urn:test|fresh-" + UUID.randomUUID() + "&_summary=count";
		String tag = search.substring(search.indexOf('|') + 1, search.indexOf('&'));
		String careTeam = "{\"resourceType\":\"CareTeam\",\"meta\":{\"tag\":[{\"system\":\"urn:test\",\"code\":\"" + tag + "\"}]}}";

		for (int expected = 0; expected < 3; expected++) {
			assertEquals(expected, get(search).json().path("total").asInt(), "stale (cached) search result");
			assertEquals(201, send("POST", "/CareTeam", careTeam).status());
		}
	}

	@Test
	void restHookSubscriptionDeliversToTheEndpoint() throws Exception {
		String hookPath = "/hook-" + UUID.randomUUID();
		Response subscription = send("POST", "/Subscription", """
				{"resourceType": "Subscription", "status": "requested", "reason": "test",
				 "criteria": "CommunicationRequest?",
				 "channel": {"type": "rest-hook", "endpoint": "%s",
				             "payload": "application/fhir+json", "header": ["Authorization: Bearer x"]}}"""
				.formatted(receiver.baseUrl() + hookPath));
		assertEquals(201, subscription.status(), subscription.body());
		awaitSubscriptionActive(subscription.json().path("id").asText());

		String id = "thread-" + UUID.randomUUID();
		send("PUT", "/CommunicationRequest/" + id, "{\"resourceType\":\"CommunicationRequest\",\"id\":\"" + id + "\",\"status\":\"active\"}");

		HookReceiver.Request delivery = receiver.await(
				r -> r.path().equals(hookPath + "/CommunicationRequest/" + id), DEADLINE, "rest-hook delivery");
		assertEquals("PUT", delivery.method());
		assertEquals("Bearer x", delivery.authorization());
		assertEquals(id, JSON.readTree(delivery.body()).path("id").asText());
	}

	private void awaitSubscriptionActive(String id) throws Exception {
		long end = System.nanoTime() + DEADLINE.toNanos();
		String status = "";
		while (System.nanoTime() < end) {
			status = get("/Subscription/" + id).json().path("status").asText();
			if ("active".equals(status)) {
				return;
			}
			Thread.sleep(50);
		}
		throw new AssertionError("Subscription/" + id + " never became active; status " + status);
	}

	private static java.util.function.Predicate<HookReceiver.Request> isNotifyFor(String id) {
		return r -> r.path().equals(NOTIFY_PATH) && r.body().contains("\"id\": \"" + id + "\"");
	}

	private static List<String> severities(Response outcome) {
		List<String> result = new ArrayList<>();
		outcome.json().path("issue").forEach(issue -> result.add(issue.path("severity").asText()));
		return result;
	}

	private record Response(int status, String body) {
		JsonNode json() {
			try {
				return JSON.readTree(body);
			} catch (IOException e) {
				throw new AssertionError("not JSON: " + body, e);
			}
		}
	}

	private static Response get(String path) throws Exception {
		return getAbsolute(base + path);
	}

	private static Response getAbsolute(String url) throws Exception {
		HttpRequest request = HttpRequest.newBuilder(URI.create(url.replace("|", "%7C")))
				.header("Accept", "application/fhir+json")
				.GET()
				.build();
		HttpResponse<String> response = HTTP.send(request, HttpResponse.BodyHandlers.ofString());
		return new Response(response.statusCode(), response.body());
	}

	private static Response send(String method, String path, String body) throws Exception {
		HttpRequest request = HttpRequest.newBuilder(URI.create(base + path))
				.header("Content-Type", "application/fhir+json")
				.header("Accept", "application/fhir+json")
				.method(method, HttpRequest.BodyPublishers.ofString(body))
				.build();
		HttpResponse<String> response = HTTP.send(request, HttpResponse.BodyHandlers.ofString());
		assertNotNull(response.body());
		return new Response(response.statusCode(), response.body());
	}
}
