package org.synapse_fhir.notify;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.io.IOException;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.Executors;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

/**
 * Delivers notifications to Synapse off the caller's thread.
 *
 * <p>One worker thread sends; a bounded count of notifications may be waiting or retrying at
 * once, and anything beyond it is dropped with a warning, so {@link #submit} never blocks. A
 * failed attempt is not retried by sleeping in the worker: a timer puts it back in the worker's
 * queue after the backoff, so the worker keeps serving new work meanwhile.
 *
 * <p>One resource waits at most once: a change of a resource whose notification is still
 * queued replaces it in place (the receiver re-reads the resource, so the last version says
 * it all), and a retry of a change is dropped once a newer change of the resource came in.
 */
final class Notifier implements AutoCloseable {

	private static final Logger LOG = LoggerFactory.getLogger(Notifier.class);

	private final NotifySettings settings;
	private final HttpClient http;
	private final ThreadPoolExecutor worker;
	private final ScheduledExecutorService retryTimer;
	/** Notifications accepted and not yet finished (queued, sending, or waiting for a retry). */
	private final AtomicInteger inFlight = new AtomicInteger();
	/** The queued notification of each resource ({@code Type/id}), until the worker takes it. */
	private final ConcurrentHashMap<String, Pending> queued = new ConcurrentHashMap<>();
	/** Each resource's newest change not finished yet (its submission number). */
	private final ConcurrentHashMap<String, Long> newest = new ConcurrentHashMap<>();
	private final AtomicLong submissions = new AtomicLong();

	private static final long DROP_WARNING_INTERVAL_NANOS = TimeUnit.SECONDS.toNanos(10);
	private final AtomicLong dropped = new AtomicLong();
	private final AtomicLong lastDropWarning = new AtomicLong();

	Notifier(NotifySettings settings) {
		this.settings = settings;
		this.http = HttpClient.newBuilder()
				.connectTimeout(settings.connectTimeout())
				// Plain HTTP/1.1: no h2c upgrade dance with the receiver.
				.version(HttpClient.Version.HTTP_1_1)
				.build();
		this.worker = new ThreadPoolExecutor(
				1, 1, 0L, TimeUnit.MILLISECONDS,
				new ArrayBlockingQueue<>(settings.capacity()),
				daemon("synapse-notify-worker"));
		this.retryTimer = Executors.newSingleThreadScheduledExecutor(daemon("synapse-notify-retry"));
	}

	/** Accepts a notification for delivery, or drops it if too many are in flight. Never blocks. */
	void submit(Notification notification) {
		long number = submissions.incrementAndGet();
		newest.put(notification.resourceKey(), number);
		offer(new Pending(notification, 1, number));
	}

	/** Notifications accepted but not finished yet; for tests and diagnostics. */
	int inFlight() {
		return inFlight.get();
	}

	private void offer(Pending offered) {
		String key = offered.notification().resourceKey();
		Pending[] created = new Pending[1];
		queued.compute(key, (k, waiting) -> {
			if (waiting == null) {
				created[0] = offered;
				return offered;
			}
			// The newer change takes the waiting one's place in the queue.
			return offered.number() > waiting.number() ? offered : waiting;
		});
		if (created[0] == null) {
			return; // folded into the one waiting
		}
		if (inFlight.incrementAndGet() > settings.capacity()) {
			inFlight.decrementAndGet();
			// (Unconditionally: a newer change folded into this one meanwhile has no task either.)
			queued.remove(key);
			newest.remove(key, offered.number());
			drop(offered.notification(), "queue full");
			return;
		}
		try {
			worker.execute(() -> deliver(key));
		} catch (RejectedExecutionException e) {
			inFlight.decrementAndGet();
			queued.remove(key);
			newest.remove(key, offered.number());
			drop(offered.notification(), "notifier stopped or queue full");
		}
	}

	@Override
	public void close() {
		retryTimer.shutdownNow();
		worker.shutdownNow();
	}

	private void deliver(String key) {
		// Taken out before sending: a change arriving meanwhile is queued anew, not lost.
		Pending pending = queued.remove(key);
		if (pending == null) {
			inFlight.decrementAndGet();
			return;
		}
		Notification notification = pending.notification();
		int attempt = pending.attempt();
		Outcome outcome = send(notification);
		if (outcome == Outcome.RETRY && attempt < settings.maxAttempts()) {
			long delay = backoffMillis(attempt);
			LOG.debug("Notify {} failed (attempt {}), retrying in {} ms", notification, attempt, delay);
			try {
				retryTimer.schedule(() -> retry(pending), delay, TimeUnit.MILLISECONDS);
				return;
			} catch (RejectedExecutionException e) {
				inFlight.decrementAndGet(); // shutting down
				return;
			}
		}
		inFlight.decrementAndGet();
		newest.remove(key, pending.number());
		if (outcome == Outcome.RETRY) {
			LOG.warn("Giving up notifying Synapse of {} after {} attempts", notification, attempt);
		}
	}

	private void retry(Pending failed) {
		inFlight.decrementAndGet();
		Long latest = newest.get(failed.notification().resourceKey());
		if (latest == null || latest != failed.number()) {
			return; // a newer change of the resource was reported since
		}
		offer(new Pending(failed.notification(), failed.attempt() + 1, failed.number()));
	}

	private Outcome send(Notification notification) {
		HttpRequest.Builder request = HttpRequest.newBuilder(settings.url())
				.timeout(settings.requestTimeout())
				.header("Content-Type", "application/json")
				.POST(HttpRequest.BodyPublishers.ofString(notification.toJson()));
		if (settings.secret() != null) {
			request.header("Authorization", "Bearer " + settings.secret());
		}
		try {
			int status = http.send(request.build(), HttpResponse.BodyHandlers.discarding()).statusCode();
			if (status >= 200 && status < 300) {
				return Outcome.DONE;
			}
			if (status >= 500 || status == 408 || status == 429) {
				LOG.debug("Synapse answered {} for {}", status, notification);
				return Outcome.RETRY;
			}
			// Other 4xx: our request is wrong (secret, body); retrying would not help.
			LOG.warn("Synapse rejected notification of {} with HTTP {}; not retrying", notification, status);
			return Outcome.DONE;
		} catch (IOException e) {
			// Connection refused, reset, or timed out (HttpTimeoutException is an IOException).
			LOG.debug("Could not reach Synapse for {}: {}", notification, e.toString());
			return Outcome.RETRY;
		} catch (InterruptedException e) {
			Thread.currentThread().interrupt();
			return Outcome.DONE;
		}
	}

	/** Exponential backoff with "equal jitter": half fixed, half random, so retries spread out. */
	private long backoffMillis(int attempt) {
		long base = settings.initialBackoff().toMillis() << Math.min(attempt - 1, 20);
		long half = Math.max(1, base / 2);
		return half + ThreadLocalRandom.current().nextLong(half + 1);
	}

	private void drop(Notification notification, String reason) {
		long count = dropped.incrementAndGet();
		// At most one warning per interval: a down receiver under load must not flood the log.
		long now = System.nanoTime();
		long last = lastDropWarning.get();
		if ((last == 0 || now - last >= DROP_WARNING_INTERVAL_NANOS) && lastDropWarning.compareAndSet(last, now)) {
			LOG.warn("Dropped notification of {} ({}); {} dropped since start", notification, reason, count);
		}
	}

	private static java.util.concurrent.ThreadFactory daemon(String name) {
		return runnable -> {
			Thread thread = new Thread(runnable, name);
			thread.setDaemon(true);
			return thread;
		};
	}

	private enum Outcome {
		DONE,
		RETRY
	}

	/** A notification waiting for the worker, which attempt at it that will be, and its submission number. */
	private record Pending(Notification notification, int attempt, long number) {
	}
}
