package org.synapse_fhir.devserver;

import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;

class DataSourceConfigTest {

	@Test
	void h2IsClosedBySpringNotByItsShutdownHook() {
		assertEquals("jdbc:h2:file:/data/fhir;DB_CLOSE_ON_EXIT=FALSE", DataSourceConfig.closedBySpring("jdbc:h2:file:/data/fhir"));
		assertEquals("jdbc:h2:mem:x;DB_CLOSE_DELAY=-1;DB_CLOSE_ON_EXIT=FALSE",
				DataSourceConfig.closedBySpring("jdbc:h2:mem:x;DB_CLOSE_DELAY=-1"));
	}

	@Test
	void leavesExplicitSettingsAndOtherDatabasesAlone() {
		assertEquals("jdbc:h2:file:/d;db_close_on_exit=TRUE", DataSourceConfig.closedBySpring("jdbc:h2:file:/d;db_close_on_exit=TRUE"));
		assertEquals("jdbc:postgresql://127.0.0.1/fhir", DataSourceConfig.closedBySpring("jdbc:postgresql://127.0.0.1/fhir"));
	}
}
