package org.synapse_fhir.devserver;

import ca.uhn.fhir.interceptor.api.IInterceptorService;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.core.env.Environment;
import org.synapse_fhir.notify.NotifySettings;
import org.synapse_fhir.notify.SynapseNotifyInterceptor;

/**
 * Loads the Synapse notify shim. It is registered on the JPA interceptor service, not on the
 * REST server, so writes that do not come through REST (batch jobs, internal DAO calls) are
 * reported too.
 *
 * <p>Settings come from the Spring environment: command-line {@code --SYNAPSE_NOTIFY_URL=...},
 * then system properties, then environment variables.
 */
@Configuration
public class NotifyConfig {

	@Bean(destroyMethod = "shutdown")
	public SynapseNotifyInterceptor synapseNotifyInterceptor(Environment environment, IInterceptorService interceptors) {
		SynapseNotifyInterceptor interceptor = new SynapseNotifyInterceptor(NotifySettings.from(environment::getProperty));
		interceptors.registerInterceptor(interceptor);
		return interceptor;
	}
}
