package org.synapse_fhir.devserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import jakarta.persistence.EntityManagerFactory;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import java.util.Properties;
import javax.sql.DataSource;

/** HAPI's JPA storage for R4 on the Boot data source (H2 in memory unless a JDBC URL is given). */
@Configuration
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class
})
public class JpaStorageConfig {

	@Bean
	public JpaStorageSettings storageSettings(
			@Value("${fhir.enforce-referential-integrity-on-delete:true}") boolean integrityOnDelete) {
		JpaStorageSettings settings = new JpaStorageSettings();
		// Off (--fhir.enforce-referential-integrity-on-delete=false), a resource others refer to
		// can be deleted, as many production servers allow: the module must cope with dangling
		// references (a deleted person leaves every team that listed them).
		settings.setEnforceReferentialIntegrityOnDelete(integrityOnDelete);
		// Clients may PUT Patient/abc to create it; server-assigned ids are UUIDs so they never collide.
		settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
		settings.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
		// References to resources on other servers (e.g. a practitioner directory) are allowed.
		settings.setAllowExternalReferences(true);
		// HAPI reuses an identical search's results for 60 s by default, so a search right after a
		// write can miss it. A dev/test server must answer with what is stored now.
		settings.setReuseCachedSearchResultsForMillis(null);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		factory.setJpaProperties(hibernateProperties());
		return factory;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	private static Properties hibernateProperties() {
		Properties properties = new Properties();
		properties.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		// Creates the schema on first start and keeps an H2 file database usable across restarts.
		properties.put("hibernate.hbm2ddl.auto", "update");
		properties.put("hibernate.format_sql", "false");
		properties.put("hibernate.show_sql", "false");
		properties.put("hibernate.jdbc.batch_size", "20");
		properties.put("hibernate.cache.use_query_cache", "false");
		properties.put("hibernate.cache.use_second_level_cache", "false");
		// No full-text index: plain JPA search is all the dev server needs.
		properties.put("hibernate.search.enabled", "false");
		return properties;
	}
}
