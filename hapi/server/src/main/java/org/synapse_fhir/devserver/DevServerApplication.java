package org.synapse_fhir.devserver;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.SpringBootConfiguration;
import org.springframework.boot.autoconfigure.ImportAutoConfiguration;
import org.springframework.boot.autoconfigure.context.PropertyPlaceholderAutoConfiguration;
import org.springframework.boot.autoconfigure.jdbc.DataSourceAutoConfiguration;
import org.springframework.boot.autoconfigure.web.servlet.ServletWebServerFactoryAutoConfiguration;
import org.springframework.boot.web.context.WebServerInitializedEvent;
import org.springframework.context.ApplicationListener;
import org.springframework.context.ConfigurableApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;

/**
 * A minimal HAPI FHIR JPA server (R4, H2) for development, demos and tests.
 *
 * <p>Only three Spring Boot auto-configurations are used (web server, data source, property
 * placeholders) instead of {@code @EnableAutoConfiguration}: HAPI brings Quartz, Hibernate,
 * Elasticsearch and more onto the classpath, and Boot would otherwise configure them all.
 */
@SpringBootConfiguration
@ImportAutoConfiguration({
	PropertyPlaceholderAutoConfiguration.class,
	ServletWebServerFactoryAutoConfiguration.class,
	DataSourceAutoConfiguration.class
})
@Import({
	DataSourceConfig.class,
	JpaStorageConfig.class,
	SubscriptionConfig.class,
	RestServerConfig.class,
	NotifyConfig.class
})
public class DevServerApplication {

	private static final Logger LOG = LoggerFactory.getLogger(DevServerApplication.class);

	public static void main(String[] args) {
		start(args);
	}

	public static ConfigurableApplicationContext start(String... args) {
		return SpringApplication.run(DevServerApplication.class, args);
	}

	/** One line that says where to point clients, whatever port was asked for (0 = random). */
	@Bean
	public ApplicationListener<WebServerInitializedEvent> announceBaseUrl(
			@Value("${server.address:127.0.0.1}") String address) {
		return event -> LOG.info("FHIR R4 server at http://{}:{}/fhir", address, event.getWebServer().getPort());
	}
}
