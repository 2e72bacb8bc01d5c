package org.synapse_fhir.notify;

import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

import java.util.Map;
import java.util.Set;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class NotifySettingsTest {

	@AfterEach
	void clearProperties() {
		System.clearProperty(NotifySettings.URL_KEY);
		System.clearProperty(NotifySettings.SECRET_KEY);
		System.clearProperty(NotifySettings.TYPES_KEY);
	}

	@Test
	void readsSystemProperties() {
		System.setProperty(NotifySettings.URL_KEY, "http://127.0.0.1:8008/_synapse/client/fhir/notify");
		System.setProperty(NotifySettings.SECRET_KEY, "abc");
		System.setProperty(NotifySettings.TYPES_KEY, " CareTeam , Patient,,");

		NotifySettings settings = NotifySettings.fromEnvironment();

		assertTrue(settings.isActive());
		assertEquals("http://127.0.0.1:8008/_synapse/client/fhir/notify", settings.url().toString());
		assertEquals("abc", settings.secret());
		assertEquals(Set.of("CareTeam", "Patient"), settings.types());
	}

	@Test
	void defaultsWhenOnlyTheUrlIsGiven() {
		NotifySettings settings = NotifySettings.from(Map.of(NotifySettings.URL_KEY, "https://synapse.example/n")::get);

		assertEquals(NotifySettings.DEFAULT_TYPES, settings.types());
		assertEquals(
				Set.of("CareTeam", "CommunicationRequest", "Communication", "Practitioner", "PractitionerRole",
						"RelatedPerson", "Patient"),
				settings.types());
		assertNull(settings.secret());
		assertEquals(5, settings.maxAttempts());
	}

	@Test
	void blankUrlMeansInactive() {
		assertFalse(NotifySettings.from(Map.of(NotifySettings.URL_KEY, "  ")::get).isActive());
		assertFalse(NotifySettings.from(key -> null).isActive());
	}

	@Test
	void rejectsAUrlThatIsNotHttp() {
		assertThrows(IllegalArgumentException.class,
				() -> NotifySettings.from(Map.of(NotifySettings.URL_KEY, "ftp://host/x")::get));
		assertThrows(IllegalArgumentException.class,
				() -> NotifySettings.from(Map.of(NotifySettings.URL_KEY, "/relative")::get));
	}

	@Test
	void neverPrintsTheSecret() {
		NotifySettings settings = NotifySettings.of("http://127.0.0.1:1/n", "top-secret", Set.of("Patient"));

		assertFalse(settings.toString().contains("top-secret"));
	}
}
