package org.synapse_fhir.devserver;

import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/** The FHIR REST endpoint at {@code /fhir/*}. */
@Configuration
public class RestServerConfig {

	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			JpaSystemProvider<?, ?> systemProvider,
			DatabaseBackedPagingProvider pagingProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		// transaction/batch Bundles, history, $meta and the like.
		server.registerProvider(systemProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));
		// Search results are kept in the database, so paging links ("next") survive across requests.
		server.setPagingProvider(pagingProvider);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
		server.setDefaultPrettyPrint(false);
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer restfulServer) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(restfulServer, "/fhir/*");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
