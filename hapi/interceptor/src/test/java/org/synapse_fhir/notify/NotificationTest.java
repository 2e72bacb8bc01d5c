package org.synapse_fhir.notify;

import org.hl7.fhir.r4.model.IdType;
import org.hl7.fhir.r4.model.Patient;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;

class NotificationTest {

	@Test
	void bodyIsExactlyTheContract() {
		Notification n = new Notification("CareTeam", "123", "4", Notification.Action.CREATE);

		assertEquals(
				"{\"resourceType\": \"CareTeam\", \"id\": \"123\", \"versionId\": \"4\", \"action\": \"create\"}",
				n.toJson());
	}

	@Test
	void takesTheIdPartOnlyFromAFullId() {
		Patient patient = new Patient();
		patient.setIdElement(new IdType("http://fhir.example/fhir/Patient/abc/_history/7"));

		Notification n = Notification.of(patient, Notification.Action.UPDATE);

		assertEquals("Patient", n.resourceType());
		assertEquals("abc", n.id());
		assertEquals("7", n.versionId());
	}

	@Test
	void escapesJson() {
		assertEquals(
				"{\"resourceType\": \"X\", \"id\": \"a\\\"b\\\\c\", \"versionId\": null, \"action\": \"delete\"}",
				new Notification("X", "a\"b\\c", null, Notification.Action.DELETE).toJson());
	}

	@Test
	void noIdNoNotification() {
		assertNull(Notification.of(new Patient(), Notification.Action.CREATE));
	}
}
