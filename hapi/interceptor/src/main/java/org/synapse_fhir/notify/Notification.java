package org.synapse_fhir.notify;

import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.instance.model.api.IIdType;

/**
 * One "this resource changed" message. It names the resource and nothing else: the receiver
 * re-reads the resource from FHIR, so no clinical data ever leaves through this path.
 */
record Notification(String resourceType, String id, String versionId, Action action) {

	enum Action {
		CREATE("create"),
		UPDATE("update"),
		DELETE("delete");

		final String wireName;

		Action(String wireName) {
			this.wireName = wireName;
		}
	}

	/** The notification for a stored resource, or {@code null} if it has no id yet. */
	static Notification of(IBaseResource resource, Action action) {
		IIdType idElement = resource.getIdElement();
		if (idElement == null || !idElement.hasIdPart()) {
			return null;
		}
		String type = resource.fhirType();
		if (type == null || type.isEmpty()) {
			type = idElement.getResourceType();
		}
		return new Notification(type, idElement.getIdPart(), idElement.getVersionIdPart(), action);
	}

	/**
	 * The notification for a delete. A delete stores a new ("deleted") version, one past the
	 * version it removes; HAPI 8.8 still shows the removed version at the pre-commit hook, so the
	 * deleted version is taken as the larger of the resource's and the removed one's plus one.
	 */
	static Notification ofDelete(IBaseResource resource, IIdType idBeforeDelete) {
		Notification n = of(resource, Action.DELETE);
		if (n == null || idBeforeDelete == null) {
			return n;
		}
		Long shown = parseVersion(n.versionId());
		Long removed = parseVersion(idBeforeDelete.getVersionIdPart());
		if (shown == null || removed == null) {
			return n;
		}
		return new Notification(n.resourceType(), n.id(), Long.toString(Math.max(shown, removed + 1)), Action.DELETE);
	}

	private static Long parseVersion(String version) {
		try {
			return version == null ? null : Long.parseLong(version);
		} catch (NumberFormatException e) {
			return null;
		}
	}

	/** Same resource, whatever the version: used to keep one notification per resource per transaction. */
	String resourceKey() {
		return resourceType + "/" + id;
	}

	/** The contract body: {@code {"resourceType": ..., "id": ..., "versionId": ..., "action": ...}}. */
	String toJson() {
		return "{\"resourceType\": " + quote(resourceType)
				+ ", \"id\": " + quote(id)
				+ ", \"versionId\": " + (versionId == null ? "null" : quote(versionId))
				+ ", \"action\": " + quote(action.wireName) + "}";
	}

	@Override
	public String toString() {
		return action.wireName + " " + resourceKey() + (versionId == null ? "" : "/_history/" + versionId);
	}

	private static String quote(String value) {
		StringBuilder out = new StringBuilder(value.length() + 2).append('"');
		for (char c : value.toCharArray()) {
			switch (c) {
				case '"' -> out.append("\\\"");
				case '\\' -> out.append("\\\\");
				default -> {
					if (c < 0x20) {
						out.append(String.format("\\u%04x", (int) c));
					} else {
						out.append(c);
					}
				}
			}
		}
		return out.append('"').toString();
	}
}
