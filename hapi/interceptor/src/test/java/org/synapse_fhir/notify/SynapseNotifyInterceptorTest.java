package org.synapse_fhir.notify;

import com.fasterxml.jackson.databind.ObjectMapper;
import org.hl7.fhir.r4.model.CareTeam;
import org.hl7.fhir.r4.model.Communication;
import org.hl7.fhir.r4.model.IdType;
import org.hl7.fhir.r4.model.Observation;
import org.hl7.fhir.r4.model.Patient;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.springframework.transaction.TransactionDefinition;
import org.springframework.transaction.support.TransactionTemplate;

import java.io.IOException;
import java.net.ServerSocket;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.CountDownLatch;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

class SynapseNotifyInterceptorTest {

	private static final ObjectMapper JSON = new ObjectMapper();
	private static final String SECRET = "s3cret-token";

	private Receiver receiver;
	private Storage storage;
	private SynapseNotifyInterceptor interceptor;

	@BeforeEach
	void setUp() throws IOException {
		receiver = Receiver.start();
		storage = new Storage();
	}

	@AfterEach
	void tearDown() {
		if (interceptor != null) {
			interceptor.shutdown();
		}
		receiver.close();
	}

	private void install(NotifySettings settings) {
		interceptor = new SynapseNotifyInterceptor(settings);
		storage.register(interceptor);
	}

	private NotifySettings settings() {
		return NotifySettings.of(receiver.url().toString(), SECRET, NotifySettings.DEFAULT_TYPES)
				.withRetries(4, Duration.ofMillis(20));
	}

	@Test
	void notifiesAfterCommitAndNotBefore() throws Exception {
		install(settings());

		storage.transactions.executeWithoutResult(status -> {
			storage.create(patient("p1", "1"));
			// Still inside the transaction: nothing may have been handed to the sender yet.
			assertEquals(0, interceptor.pendingDeliveries(), "handed to sender before commit");
			assertEquals(0, receiver.count(), "receiver called before commit");
		});

		Receiver.Request request = receiver.awaitRequest(1);
		assertEquals("POST", request.method());
		assertEquals("/_synapse/client/fhir/notify", request.path());
		assertEquals("Bearer " + SECRET, request.header("Authorization"));
		assertEquals("application/json", request.header("Content-Type"));
		assertEquals(
				Map.of("resourceType", "Patient", "id", "p1", "versionId", "1", "action", "create"),
				JSON.readValue(request.body(), Map.class));
	}

	@Test
	void reportsUpdatesAndDeletesWithTheirVersion() throws Exception {
		install(settings());

		storage.transactions.executeWithoutResult(s -> storage.update(careTeam("t1", "3"), careTeam("t1", "4")));
		receiver.awaitRequest(1); // (sent: the delete is not folded into it)
		// HAPI 8.8 shows the removed version (4) on both; the delete itself is version 5.
		storage.transactions.executeWithoutResult(
				s -> storage.delete(careTeam("t1", "4"), new IdType("CareTeam", "t1", "4")));
		// Should HAPI ever show the deleted version itself, it is taken as is.
		storage.transactions.executeWithoutResult(
				s -> storage.delete(careTeam("t2", "8"), new IdType("CareTeam", "t2", "7")));

		assertEquals(Map.of("resourceType", "CareTeam", "id", "t1", "versionId", "4", "action", "update"), body(1));
		assertEquals(Map.of("resourceType", "CareTeam", "id", "t1", "versionId", "5", "action", "delete"), body(2));
		assertEquals(Map.of("resourceType", "CareTeam", "id", "t2", "versionId", "8", "action", "delete"), body(3));
	}

	@Test
	void sendsNothingWhenTheTransactionRollsBack() throws Exception {
		install(settings());

		storage.transactions.executeWithoutResult(status -> {
			storage.create(patient("rolled-back-1", "1"));
			status.setRollbackOnly();
		});
		assertThrows(IllegalStateException.class, () -> storage.transactions.executeWithoutResult(status -> {
			storage.create(patient("rolled-back-2", "1"));
			throw new IllegalStateException("second entry fails");
		}));
		assertEquals(0, storage.rows(), "both writes should have been rolled back");

		// The sender is FIFO: had anything been sent for the rolled-back writes, it would arrive first.
		storage.createCommitted(patient("committed", "1"));
		assertEquals("committed", body(1).get("id"));
		assertEquals(1, receiver.count());
	}

	@Test
	void anInnerRequiresNewTransactionIsReportedOnItsOwn() throws Exception {
		install(settings());
		TransactionTemplate requiresNew = new TransactionTemplate(storage.transactions.getTransactionManager());
		requiresNew.setPropagationBehavior(TransactionDefinition.PROPAGATION_REQUIRES_NEW);

		storage.transactions.executeWithoutResult(outer -> {
			storage.create(patient("outer", "1"));
			requiresNew.executeWithoutResult(inner -> storage.create(patient("inner", "1")));
			// The inner transaction has committed: its notification may go, the outer one may not.
			assertEquals("inner", body(1).get("id"));
			outer.setRollbackOnly();
		});
		storage.createCommitted(patient("sentinel", "1"));

		assertEquals("sentinel", body(2).get("id"));
		assertEquals(2, receiver.count());
	}

	@Test
	void ignoresTypesOutsideTheFilter() throws Exception {
		install(NotifySettings.of(receiver.url().toString(), SECRET, Set.of("CareTeam")));

		storage.createCommitted(new Observation().setIdElement(new IdType("Observation", "o1", "1")));
		storage.createCommitted(patient("p1", "1"));
		storage.createCommitted(careTeam("t1", "1"));

		assertEquals("CareTeam", body(1).get("resourceType"));
		assertEquals(1, receiver.count());
	}

	@Test
	void defaultFilterSkipsNonCareResources() throws Exception {
		install(settings());

		storage.createCommitted(new Observation().setIdElement(new IdType("Observation", "o1", "1")));
		storage.createCommitted(patient("p1", "1"));

		assertEquals("Patient", body(1).get("resourceType"));
		assertEquals(1, receiver.count());
	}

	@Test
	void reportsEachResourceOnceOnItsLastVersionPerTransaction() throws Exception {
		install(settings());

		storage.transactions.executeWithoutResult(status -> {
			storage.create(patient("p1", "1"));
			storage.create(patient("p2", "1"));
			storage.update(patient("p1", "1"), patient("p1", "2"));
		});
		storage.createCommitted(patient("sentinel", "1"));

		assertEquals(Map.of("resourceType", "Patient", "id", "p2", "versionId", "1", "action", "create"), body(1));
		assertEquals(Map.of("resourceType", "Patient", "id", "p1", "versionId", "2", "action", "update"), body(2));
		assertEquals("sentinel", body(3).get("id"));
		assertEquals(3, receiver.count());
	}

	@Test
	void notifiesAtOnceWhenThereIsNoTransaction() throws Exception {
		install(settings());

		storage.create(patient("p1", "1"));

		assertEquals("p1", body(1).get("id"));
	}

	@Test
	void retriesAfter503UntilAccepted() throws Exception {
		install(settings());
		receiver.respondWith(503, 503);

		storage.createCommitted(patient("p1", "1"));
		receiver.awaitRequest(3);
		storage.createCommitted(patient("sentinel", "1"));

		List<Receiver.Request> requests = List.of(
				receiver.awaitRequest(1), receiver.awaitRequest(2), receiver.awaitRequest(3), receiver.awaitRequest(4));
		assertEquals(requests.get(0).body(), requests.get(1).body());
		assertEquals(requests.get(0).body(), requests.get(2).body());
		assertEquals("sentinel", body(4).get("id"));
		assertEquals(4, receiver.count(), "no retry after the 202");
	}

	@ParameterizedTest
	@ValueSource(ints = {408, 429, 500, 502})
	void retriesOnTransientStatus(int status) throws Exception {
		install(settings());
		receiver.respondWith(status);

		storage.createCommitted(patient("p1", "1"));

		assertEquals(receiver.awaitRequest(1).body(), receiver.awaitRequest(2).body());
	}

	@ParameterizedTest
	@ValueSource(ints = {400, 401, 403, 404, 413})
	void doesNotRetryOnClientError(int status) throws Exception {
		install(settings());
		receiver.respondWith(status);

		storage.createCommitted(patient("rejected", "1"));
		receiver.awaitRequest(1);
		storage.createCommitted(patient("sentinel", "1"));

		assertEquals("sentinel", body(2).get("id"));
		assertEquals(2, receiver.count());
	}

	@Test
	void givesUpAfterMaxAttempts() throws Exception {
		install(settings().withRetries(3, Duration.ofMillis(5)));
		receiver.respondWith(503, 503, 503);

		storage.createCommitted(patient("p1", "1"));
		receiver.awaitRequest(3);
		storage.createCommitted(patient("sentinel", "1"));

		assertEquals("sentinel", body(4).get("id"));
		assertEquals(4, receiver.count());
	}

	@Test
	void writeSucceedsWhenTheReceiverIsDown() throws Exception {
		install(NotifySettings.of("http://127.0.0.1:" + closedPort() + "/notify", SECRET, NotifySettings.DEFAULT_TYPES)
				.withRetries(3, Duration.ofMillis(10)));

		for (int i = 0; i < 20; i++) {
			storage.createCommitted(patient("p" + i, "1"));
		}

		assertEquals(20, storage.rows());
	}

	@Test
	void writeIsNotHeldUpByAHangingReceiver() throws Exception {
		install(settings().withTimeouts(Duration.ofSeconds(2), Duration.ofSeconds(30)));
		CountDownLatch hang = receiver.hangUntilReleased();

		storage.createCommitted(patient("first", "1"));
		receiver.awaitRequest(1); // the only sender thread is now stuck inside the receiver

		for (int i = 0; i < 50; i++) {
			storage.createCommitted(patient("p" + i, "1"));
		}

		// These commits returned while the receiver was still blocked.
		assertEquals(1, hang.getCount(), "receiver was released before the writes returned");
		assertEquals(51, storage.rows());
		assertEquals(1, receiver.count());

		receiver.release();
		assertEquals("p49", body(51).get("id"));
	}

	@Test
	void dropsRatherThanBlocksWhenTheQueueIsFull() throws Exception {
		install(settings().withTimeouts(Duration.ofSeconds(2), Duration.ofSeconds(30)).withCapacity(3));
		receiver.hangUntilReleased();

		storage.createCommitted(patient("first", "1"));
		receiver.awaitRequest(1);
		for (int i = 0; i < 10; i++) {
			storage.createCommitted(patient("p" + i, "1"));
		}
		assertEquals(3, interceptor.pendingDeliveries(), "capacity bounds what waits");

		receiver.release();
		receiver.awaitRequest(3);
		storage.createCommitted(patient("sentinel", "1"));
		assertEquals("sentinel", body(4).get("id"));
		assertEquals(List.of("first", "p0", "p1", "sentinel"), receiver.all().stream()
				.map(r -> (String) parse(r.body()).get("id"))
				.toList());
	}

	@Test
	void skipsWhatTheModuleWroteButNotItsDeletes() throws Exception {
		install(settings());

		storage.createCommitted(tagged(communication("c1", "1")));
		storage.transactions.executeWithoutResult(
				s -> storage.update(tagged(communication("c1", "1")), tagged(communication("c1", "2"))));
		storage.createCommitted(communication("foreign", "1")); // another system's: no tag
		storage.transactions.executeWithoutResult(
				s -> storage.delete(tagged(communication("c1", "2")), new IdType("Communication", "c1", "2")));

		assertEquals(Map.of("resourceType", "Communication", "id", "foreign", "versionId", "1", "action", "create"),
				body(1));
		assertEquals(Map.of("resourceType", "Communication", "id", "c1", "versionId", "3", "action", "delete"),
				body(2));
		storage.createCommitted(patient("sentinel", "1"));
		assertEquals("sentinel", body(3).get("id"));
		assertEquals(3, receiver.count());
	}

	@Test
	void aResourceChangedAgainWhileItsNotificationWaitsIsReportedOnceOnItsLastVersion() throws Exception {
		install(settings().withTimeouts(Duration.ofSeconds(2), Duration.ofSeconds(30)));
		receiver.hangUntilReleased();

		storage.createCommitted(patient("first", "1"));
		receiver.awaitRequest(1); // the sender is stuck: what follows waits in the queue
		storage.createCommitted(careTeam("t1", "1"));
		for (int version = 2; version <= 5; version++) {
			String v = Integer.toString(version);
			String before = Integer.toString(version - 1);
			storage.transactions.executeWithoutResult(s -> storage.update(careTeam("t1", before), careTeam("t1", v)));
		}
		storage.createCommitted(patient("p2", "1"));
		assertEquals(3, interceptor.pendingDeliveries(), "first, t1 once, p2");

		receiver.release();
		// t1 keeps its place in the queue, with its last version.
		assertEquals(Map.of("resourceType", "CareTeam", "id", "t1", "versionId", "5", "action", "update"), body(2));
		assertEquals("p2", body(3).get("id"));
		storage.createCommitted(patient("sentinel", "1"));
		assertEquals("sentinel", body(4).get("id"));
		assertEquals(4, receiver.count());
	}

	@Test
	void aRetryOfAnOlderChangeGivesWayToTheNewerOne() throws Exception {
		install(settings().withRetries(3, Duration.ofMillis(300)));
		receiver.respondWith(503);

		storage.createCommitted(careTeam("t1", "1"));
		receiver.awaitRequest(1); // refused: its retry waits ~300 ms
		storage.transactions.executeWithoutResult(s -> storage.update(careTeam("t1", "1"), careTeam("t1", "2")));

		assertEquals(Map.of("resourceType", "CareTeam", "id", "t1", "versionId", "2", "action", "update"), body(2));
		storage.createCommitted(patient("sentinel", "1"));
		assertEquals("sentinel", body(3).get("id"));
		// Until the retry of version 1 has come due (and been dropped), something is in flight.
		long end = System.nanoTime() + Duration.ofSeconds(10).toNanos();
		while (interceptor.pendingDeliveries() > 0) {
			if (System.nanoTime() > end) {
				throw new AssertionError("the retry of version 1 never came due");
			}
			Thread.sleep(5);
		}
		assertEquals(3, receiver.count(), "the retry of version 1 was sent after version 2");
	}

	@Test
	void inactiveWithoutUrl() {
		install(NotifySettings.of(null, SECRET, NotifySettings.DEFAULT_TYPES));

		storage.createCommitted(patient("p1", "1"));

		assertEquals(false, interceptor.isActive());
		assertEquals(1, storage.rows());
	}

	private Map<?, ?> body(int n) {
		return parse(receiver.awaitRequest(n).body());
	}

	private static Map<?, ?> parse(String body) {
		try {
			return JSON.readValue(body, Map.class);
		} catch (IOException e) {
			throw new AssertionError("not JSON: " + body, e);
		}
	}

	static Patient patient(String id, String version) {
		Patient patient = new Patient();
		patient.setIdElement(new IdType("Patient", id, version));
		return patient;
	}

	static Communication communication(String id, String version) {
		Communication communication = new Communication();
		communication.setIdElement(new IdType("Communication", id, version));
		return communication;
	}

	/** As the module writes it: with its origin tag. */
	static <T extends org.hl7.fhir.r4.model.Resource> T tagged(T resource) {
		resource.getMeta().addTag(OriginTag.SYSTEM, OriginTag.CODE, null);
		return resource;
	}

	static CareTeam careTeam(String id, String version) {
		CareTeam team = new CareTeam();
		team.setIdElement(new IdType("CareTeam", id, version));
		return team;
	}

	static int closedPort() throws IOException {
		try (ServerSocket socket = new ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress())) {
			return socket.getLocalPort();
		}
	}

}
