package org.synapse_fhir.notify;

import ca.uhn.fhir.interceptor.api.HookParams;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.interceptor.executor.InterceptorService;
import ca.uhn.fhir.rest.api.InterceptorInvocationTimingEnum;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import ca.uhn.fhir.rest.api.server.storage.TransactionDetails;
import ca.uhn.fhir.rest.server.servlet.ServletRequestDetails;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.instance.model.api.IIdType;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.jdbc.datasource.DataSourceTransactionManager;
import org.springframework.jdbc.datasource.DriverManagerDataSource;
import org.springframework.transaction.support.TransactionTemplate;

import java.util.concurrent.atomic.AtomicInteger;

/**
 * Plays the part of HAPI's JPA storage in the unit tests: a real Spring transaction over an
 * in-memory H2 database, and storage hooks fired through HAPI's real {@link InterceptorService},
 * from inside that transaction, just before commit, as the JPA server does.
 */
final class Storage {

	private static final AtomicInteger DATABASES = new AtomicInteger();

	final InterceptorService interceptors = new InterceptorService("test-storage");
	final JdbcTemplate jdbc;
	final TransactionTemplate transactions;

	Storage() {
		DriverManagerDataSource dataSource =
				new DriverManagerDataSource("jdbc:h2:mem:storage" + DATABASES.incrementAndGet() + ";DB_CLOSE_DELAY=-1");
		jdbc = new JdbcTemplate(dataSource);
		jdbc.execute("create table resource_row (res_key varchar(200), res_version varchar(20))");
		transactions = new TransactionTemplate(new DataSourceTransactionManager(dataSource));
	}

	Storage register(Object interceptor) {
		interceptors.registerInterceptor(interceptor);
		return this;
	}

	/** Stores the row and fires STORAGE_PRECOMMIT_RESOURCE_CREATED, within the caller's transaction if any. */
	void create(IBaseResource resource) {
		store(resource);
		interceptors.callHooks(Pointcut.STORAGE_PRECOMMIT_RESOURCE_CREATED, common(new HookParams().add(IBaseResource.class, resource)));
	}

	void update(IBaseResource previous, IBaseResource resource) {
		store(resource);
		interceptors.callHooks(
				Pointcut.STORAGE_PRECOMMIT_RESOURCE_UPDATED,
				common(new HookParams().add(IBaseResource.class, previous).add(IBaseResource.class, resource)));
	}

	/** Fires STORAGE_PRECOMMIT_RESOURCE_DELETED with the resource as HAPI shows it and the id it removes. */
	void delete(IBaseResource resource, IIdType idBeforeDelete) {
		store(resource);
		interceptors.callHooks(
				Pointcut.STORAGE_PRECOMMIT_RESOURCE_DELETED,
				common(new HookParams().add(IBaseResource.class, resource).add(IIdType.class, idBeforeDelete)));
	}

	/** {@link #create} in its own committed transaction. */
	void createCommitted(IBaseResource resource) {
		transactions.executeWithoutResult(status -> create(resource));
	}

	int rows() {
		return jdbc.queryForObject("select count(*) from resource_row", Integer.class);
	}

	private void store(IBaseResource resource) {
		jdbc.update(
				"insert into resource_row values (?, ?)",
				resource.getIdElement().toUnqualifiedVersionless().getValue(),
				resource.getIdElement().getVersionIdPart());
	}

	private static HookParams common(HookParams params) {
		return params.add(RequestDetails.class, null)
				.add(ServletRequestDetails.class, null)
				.add(TransactionDetails.class, new TransactionDetails())
				.add(InterceptorInvocationTimingEnum.class, InterceptorInvocationTimingEnum.ACTIVE);
	}
}
