package org.synapse_fhir.notify;

import com.sun.net.httpserver.Headers;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Queue;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

import static org.junit.jupiter.api.Assertions.fail;

/** A local stand-in for Synapse's notify endpoint that records what it is sent. */
final class Receiver implements AutoCloseable {

	record Request(String method, String path, Headers headers, String body) {
		String header(String name) {
			return headers.getFirst(name);
		}
	}

	private final HttpServer server;
	private final ExecutorService threads = Executors.newCachedThreadPool();
	private final List<Request> received = new CopyOnWriteArrayList<>();
	private final Queue<Integer> scriptedStatuses = new ConcurrentLinkedQueue<>();
	private volatile CountDownLatch hang;

	private Receiver() throws IOException {
		server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
		server.createContext("/", this::handle);
		server.setExecutor(threads);
		server.start();
	}

	static Receiver start() throws IOException {
		return new Receiver();
	}

	URI url() {
		return URI.create("http://127.0.0.1:" + server.getAddress().getPort() + "/_synapse/client/fhir/notify");
	}

	/** Answer the next requests with these statuses, then 202 again. */
	void respondWith(Integer... statuses) {
		scriptedStatuses.addAll(List.of(statuses));
	}

	/** Every request from now on blocks inside the handler until {@link #release()}. */
	CountDownLatch hangUntilReleased() {
		hang = new CountDownLatch(1);
		return hang;
	}

	void release() {
		CountDownLatch latch = hang;
		if (latch != null) {
			latch.countDown();
		}
	}

	int count() {
		return received.size();
	}

	List<Request> all() {
		return new ArrayList<>(received);
	}

	/** Waits (polling, with a deadline) until at least {@code n} requests arrived; returns the n-th. */
	Request awaitRequest(int n, Duration deadline) {
		long end = System.nanoTime() + deadline.toNanos();
		while (received.size() < n) {
			if (System.nanoTime() > end) {
				fail("receiver never got request #" + n + " within " + deadline + "; got " + received.size());
			}
			pause();
		}
		return received.get(n - 1);
	}

	Request awaitRequest(int n) {
		return awaitRequest(n, Duration.ofSeconds(10));
	}

	@Override
	public void close() {
		release();
		server.stop(0);
		threads.shutdownNow();
	}

	private void handle(HttpExchange exchange) throws IOException {
		String body = new String(exchange.getRequestBody().readAllBytes(), StandardCharsets.UTF_8);
		received.add(new Request(
				exchange.getRequestMethod(), exchange.getRequestURI().getPath(), exchange.getRequestHeaders(), body));
		CountDownLatch latch = hang;
		if (latch != null) {
			try {
				latch.await(30, TimeUnit.SECONDS);
			} catch (InterruptedException e) {
				Thread.currentThread().interrupt();
			}
		}
		Integer scripted = scriptedStatuses.poll();
		exchange.sendResponseHeaders(scripted == null ? 202 : scripted, -1);
		exchange.close();
	}

	private static void pause() {
		try {
			Thread.sleep(5);
		} catch (InterruptedException e) {
			Thread.currentThread().interrupt();
			throw new IllegalStateException(e);
		}
	}
}
