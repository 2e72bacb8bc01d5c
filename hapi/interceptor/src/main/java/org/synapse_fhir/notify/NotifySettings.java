package org.synapse_fhir.notify;

import java.net.URI;
import java.time.Duration;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashSet;
import java.util.Set;
import java.util.function.Function;

/**
 * Where and how the shim notifies Synapse.
 *
 * <p>Read from configuration keys {@value #URL_KEY}, {@value #SECRET_KEY} and {@value #TYPES_KEY}.
 * {@link #fromEnvironment()} looks at the Java system property first, then at the environment
 * variable of the same name, so a test or a {@code -D} flag can override the process environment.
 *
 * @param url where to POST; {@code null} means the shim is inactive
 * @param secret sent as {@code Authorization: Bearer <secret>}; {@code null} sends no header
 * @param types resource types to report; others are ignored
 * @param connectTimeout TCP connect timeout of one attempt
 * @param requestTimeout whole-request timeout of one attempt
 * @param maxAttempts attempts per notification, first one included
 * @param initialBackoff delay before the second attempt; doubles after each failure (with jitter)
 * @param capacity notifications waiting or retrying at once; beyond it new ones are dropped
 */
public record NotifySettings(
		URI url,
		String secret,
		Set<String> types,
		Duration connectTimeout,
		Duration requestTimeout,
		int maxAttempts,
		Duration initialBackoff,
		int capacity) {

	public static final String URL_KEY = "SYNAPSE_NOTIFY_URL";
	public static final String SECRET_KEY = "SYNAPSE_NOTIFY_SECRET";
	public static final String TYPES_KEY = "SYNAPSE_NOTIFY_TYPES";

	public static final Set<String> DEFAULT_TYPES = Collections.unmodifiableSet(new LinkedHashSet<>(Arrays.asList(
			"CareTeam",
			"CommunicationRequest",
			"Communication",
			"Practitioner",
			"PractitionerRole",
			"RelatedPerson",
			"Patient")));

	public static final Duration DEFAULT_CONNECT_TIMEOUT = Duration.ofSeconds(2);
	public static final Duration DEFAULT_REQUEST_TIMEOUT = Duration.ofSeconds(5);
	public static final int DEFAULT_MAX_ATTEMPTS = 5;
	public static final Duration DEFAULT_INITIAL_BACKOFF = Duration.ofMillis(200);
	public static final int DEFAULT_CAPACITY = 1000;

	public NotifySettings {
		types = Collections.unmodifiableSet(new LinkedHashSet<>(types));
		if (maxAttempts < 1 || capacity < 1) {
			throw new IllegalArgumentException("maxAttempts and capacity must be at least 1");
		}
	}

	/** Settings from system properties, else environment variables (see class comment). */
	public static NotifySettings fromEnvironment() {
		return from(key -> {
			String value = System.getProperty(key);
			return isBlank(value) ? System.getenv(key) : value;
		});
	}

	/**
	 * Settings from any key lookup (e.g. a Spring {@code Environment}); timeouts and retries take
	 * their defaults.
	 *
	 * @throws IllegalArgumentException if the URL is set but is not an absolute http(s) URL
	 */
	public static NotifySettings from(Function<String, String> lookup) {
		String url = lookup.apply(URL_KEY);
		String secret = lookup.apply(SECRET_KEY);
		String types = lookup.apply(TYPES_KEY);
		return of(
				isBlank(url) ? null : url.trim(),
				isBlank(secret) ? null : secret.trim(),
				isBlank(types) ? DEFAULT_TYPES : parseTypes(types));
	}

	/** Settings with default timeouts, retries and capacity. {@code url == null} means inactive. */
	public static NotifySettings of(String url, String secret, Set<String> types) {
		return new NotifySettings(
				url == null ? null : parseUrl(url),
				secret,
				types,
				DEFAULT_CONNECT_TIMEOUT,
				DEFAULT_REQUEST_TIMEOUT,
				DEFAULT_MAX_ATTEMPTS,
				DEFAULT_INITIAL_BACKOFF,
				DEFAULT_CAPACITY);
	}

	public boolean isActive() {
		return url != null;
	}

	public boolean reports(String resourceType) {
		return types.contains(resourceType);
	}

	public NotifySettings withRetries(int theMaxAttempts, Duration theInitialBackoff) {
		return new NotifySettings(
				url, secret, types, connectTimeout, requestTimeout, theMaxAttempts, theInitialBackoff, capacity);
	}

	public NotifySettings withTimeouts(Duration theConnectTimeout, Duration theRequestTimeout) {
		return new NotifySettings(
				url, secret, types, theConnectTimeout, theRequestTimeout, maxAttempts, initialBackoff, capacity);
	}

	public NotifySettings withCapacity(int theCapacity) {
		return new NotifySettings(
				url, secret, types, connectTimeout, requestTimeout, maxAttempts, initialBackoff, theCapacity);
	}

	@Override
	public String toString() {
		// Never print the secret.
		return "NotifySettings[url=" + url + ", secret=" + (secret == null ? "unset" : "set") + ", types=" + types
				+ ", maxAttempts=" + maxAttempts + ", capacity=" + capacity + "]";
	}

	private static URI parseUrl(String url) {
		URI uri = URI.create(url);
		String scheme = uri.getScheme();
		if (!"http".equalsIgnoreCase(scheme) && !"https".equalsIgnoreCase(scheme) || uri.getHost() == null) {
			throw new IllegalArgumentException(URL_KEY + " must be an absolute http(s) URL, got: " + url);
		}
		return uri;
	}

	private static Set<String> parseTypes(String csv) {
		Set<String> result = new LinkedHashSet<>();
		for (String part : csv.split(",")) {
			if (!part.isBlank()) {
				result.add(part.trim());
			}
		}
		return result;
	}

	private static boolean isBlank(String value) {
		return value == null || value.isBlank();
	}
}
