package org.synapse_fhir.devserver;

import com.zaxxer.hikari.HikariDataSource;
import org.springframework.boot.autoconfigure.jdbc.DataSourceProperties;
import org.springframework.boot.context.properties.ConfigurationProperties;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

import java.util.Locale;

/**
 * The JDBC pool, from the usual {@code spring.datasource.*} properties, with one change: H2 is
 * told not to close itself from its own JVM shutdown hook. Left to do so, it closes the
 * database while HAPI's scheduler and the pool are still shutting down (thousands of
 * "Database is already closed" errors in the H2 trace file); Spring closes the pool, and with
 * it the database, at the end of shutdown instead.
 */
@Configuration
public class DataSourceConfig {

	@Bean
	@ConfigurationProperties("spring.datasource.hikari")
	public HikariDataSource dataSource(DataSourceProperties properties) {
		HikariDataSource dataSource =
				properties.initializeDataSourceBuilder().type(HikariDataSource.class).build();
		dataSource.setJdbcUrl(closedBySpring(dataSource.getJdbcUrl()));
		return dataSource;
	}

	static String closedBySpring(String url) {
		if (url != null
				&& url.startsWith("jdbc:h2:")
				&& !url.toUpperCase(Locale.ROOT).contains("DB_CLOSE_ON_EXIT")) {
			return url + ";DB_CLOSE_ON_EXIT=FALSE";
		}
		return url;
	}
}
