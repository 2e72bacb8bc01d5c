package org.synapse_fhir.notify;

import org.junit.jupiter.api.Test;

import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

import static org.junit.jupiter.api.Assertions.assertEquals;

/**
 * Measures what the shim adds to a commit, with Synapse healthy, down (connection refused) and
 * hanging (never answers), against the same commit without the shim. Scenarios are warmed up,
 * then measured in interleaved rounds so JIT warm-up and machine noise hit them alike. Prints
 * the numbers and ratios; asserts only that every write went through, never on timings.
 */
class CommitLatencyTest {

	private static final int WARMUP = 1000;
	private static final int ROUNDS = 10;
	private static final int COMMITS_PER_ROUND = 100;
	private static final AtomicInteger IDS = new AtomicInteger();

	@Test
	void measureCommitLatency() throws Exception {
		List<SynapseNotifyInterceptor> interceptors = new ArrayList<>();
		try (Receiver healthyReceiver = Receiver.start();
				Receiver hangingReceiver = Receiver.start()) {
			hangingReceiver.hangUntilReleased();
			Map<String, Storage> scenarios = new LinkedHashMap<>();
			scenarios.put("no interceptor", new Storage());
			scenarios.put("receiver healthy", withShim(healthyReceiver.url().toString(), interceptors));
			scenarios.put("receiver down", withShim(
					"http://127.0.0.1:" + SynapseNotifyInterceptorTest.closedPort() + "/notify", interceptors));
			scenarios.put("receiver hanging", withShim(hangingReceiver.url().toString(), interceptors));

			scenarios.values().forEach(storage -> run(storage, WARMUP));
			hangingReceiver.awaitRequest(1); // its sender is stuck from here on

			Map<String, long[]> samples = new LinkedHashMap<>();
			scenarios.keySet().forEach(name -> samples.put(name, new long[0]));
			for (int round = 0; round < ROUNDS; round++) {
				for (Map.Entry<String, Storage> scenario : scenarios.entrySet()) {
					samples.merge(scenario.getKey(), run(scenario.getValue(), COMMITS_PER_ROUND), CommitLatencyTest::concat);
				}
			}
			for (Storage storage : scenarios.values()) {
				assertEquals(WARMUP + ROUNDS * COMMITS_PER_ROUND, storage.rows());
			}
			print(samples);
		} finally {
			interceptors.forEach(SynapseNotifyInterceptor::shutdown);
		}
	}

	private static Storage withShim(String url, List<SynapseNotifyInterceptor> interceptors) {
		SynapseNotifyInterceptor interceptor = new SynapseNotifyInterceptor(
				NotifySettings.of(url, "secret", NotifySettings.DEFAULT_TYPES));
		interceptors.add(interceptor);
		return new Storage().register(interceptor);
	}

	private static long[] run(Storage storage, int commits) {
		long[] nanos = new long[commits];
		for (int i = 0; i < commits; i++) {
			String id = "lat" + IDS.incrementAndGet();
			long start = System.nanoTime();
			storage.createCommitted(SynapseNotifyInterceptorTest.patient(id, "1"));
			nanos[i] = System.nanoTime() - start;
		}
		return nanos;
	}

	private static void print(Map<String, long[]> samples) {
		double baseline = median(samples.get("no interceptor"));
		System.out.println();
		System.out.printf(Locale.ROOT, "Commit latency, %d commits per scenario (H2 in memory, one insert + hook per transaction):%n",
				ROUNDS * COMMITS_PER_ROUND);
		for (Map.Entry<String, long[]> entry : samples.entrySet()) {
			long[] sorted = entry.getValue().clone();
			Arrays.sort(sorted);
			System.out.printf(Locale.ROOT,
					"  %-18s median %7.1f us  p99 %8.1f us  mean %7.1f us  median ratio vs no interceptor %.2f%n",
					entry.getKey(),
					median(sorted),
					sorted[(int) Math.round(0.99 * (sorted.length - 1))] / 1000.0,
					Arrays.stream(sorted).average().orElse(0) / 1000.0,
					median(sorted) / baseline);
		}
		System.out.println();
	}

	private static double median(long[] nanos) {
		long[] sorted = nanos.clone();
		Arrays.sort(sorted);
		return sorted[sorted.length / 2] / 1000.0;
	}

	private static long[] concat(long[] a, long[] b) {
		long[] out = Arrays.copyOf(a, a.length + b.length);
		System.arraycopy(b, 0, out, a.length, b.length);
		return out;
	}
}
