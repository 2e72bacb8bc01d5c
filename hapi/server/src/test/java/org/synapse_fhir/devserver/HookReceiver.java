package org.synapse_fhir.devserver;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.Executors;
import java.util.function.Predicate;

import static org.junit.jupiter.api.Assertions.fail;

/** A local HTTP endpoint standing in for Synapse: records every request, answers 202. */
final class HookReceiver implements AutoCloseable {

	record Request(String method, String path, String authorization, String contentType, String body) {}

	private final HttpServer server;
	private final List<Request> received = new CopyOnWriteArrayList<>();

	HookReceiver() throws IOException {
		server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
		server.createContext("/", this::handle);
		server.setExecutor(Executors.newCachedThreadPool());
		server.start();
	}

	String baseUrl() {
		return "http://127.0.0.1:" + server.getAddress().getPort();
	}

	List<Request> matching(Predicate<Request> filter) {
		return received.stream().filter(filter).toList();
	}

	/** Polls until a request matching {@code filter} has arrived; fails with {@code what} after the deadline. */
	Request await(Predicate<Request> filter, Duration deadline, String what) {
		long end = System.nanoTime() + deadline.toNanos();
		while (System.nanoTime() < end) {
			List<Request> hits = matching(filter);
			if (!hits.isEmpty()) {
				return hits.get(0);
			}
			try {
				Thread.sleep(20);
			} catch (InterruptedException e) {
				Thread.currentThread().interrupt();
				break;
			}
		}
		return fail(what + " never arrived within " + deadline + "; received: " + received);
	}

	@Override
	public void close() {
		server.stop(0);
	}

	private void handle(HttpExchange exchange) throws IOException {
		String body = new String(exchange.getRequestBody().readAllBytes(), StandardCharsets.UTF_8);
		received.add(new Request(
				exchange.getRequestMethod(),
				exchange.getRequestURI().getPath(),
				exchange.getRequestHeaders().getFirst("Authorization"),
				exchange.getRequestHeaders().getFirst("Content-Type"),
				body));
		exchange.sendResponseHeaders(202, -1);
		exchange.close();
	}
}
