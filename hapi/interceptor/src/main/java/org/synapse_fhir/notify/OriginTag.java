package org.synapse_fhir.notify;

import org.hl7.fhir.instance.model.api.IBaseMetaType;
import org.hl7.fhir.instance.model.api.IBaseResource;

/**
 * The tag the Synapse module puts on everything it writes (its Communications, the threads it
 * opens, its Tasks). The module never acts on a change to such a resource, so notifying it would
 * only queue an echo of every recorded message ahead of the changes that matter (a CareTeam).
 */
final class OriginTag {

	static final String SYSTEM = "urn:synapse-fhir-module:origin";
	static final String CODE = "matrix";

	private OriginTag() {
	}

	/** Whether the module wrote this version of the resource (it carries the tag). */
	static boolean isOnModuleWrite(IBaseResource resource) {
		IBaseMetaType meta = resource.getMeta();
		return meta != null && meta.getTag(SYSTEM, CODE) != null;
	}
}
