package org.synapse_fhir.notify;

import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.instance.model.api.IIdType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.transaction.support.TransactionSynchronizationManager;

/**
 * Tells Synapse which FHIR resources changed, right after the change is committed ("notify,
 * then pull": the message names the resource, the receiver re-reads it).
 *
 * <p>Resources the module itself wrote (they carry its origin tag, {@link OriginTag}) are not
 * reported when created or updated: the module would only skip the echo, after it had waited
 * in the queue ahead of the changes that matter.
 *
 * <p>The hooks run inside the FHIR write's transaction, just before commit. They only record
 * what changed; the HTTP call happens after commit on a background thread. Nothing here may
 * fail or slow the write: every hook catches its own errors and never waits on the network.
 *
 * <p>Configured by {@link NotifySettings#fromEnvironment()}: {@code SYNAPSE_NOTIFY_URL} (unset
 * means inactive), {@code SYNAPSE_NOTIFY_SECRET}, {@code SYNAPSE_NOTIFY_TYPES}.
 */
@Interceptor
public class SynapseNotifyInterceptor {

	private static final Logger LOG = LoggerFactory.getLogger(SynapseNotifyInterceptor.class);

	private final NotifySettings settings;
	/** {@code null} when inactive. */
	private final Notifier notifier;
	/** Key of this interceptor's batch among the current transaction's resources. */
	private final Object transactionKey = new Object();

	/** For HAPI's {@code hapi.fhir.custom-interceptor-classes}: settings from the environment. */
	public SynapseNotifyInterceptor() {
		this(NotifySettings.fromEnvironment());
	}

	public SynapseNotifyInterceptor(NotifySettings settings) {
		this.settings = settings;
		if (settings.isActive()) {
			this.notifier = new Notifier(settings);
			LOG.info("Synapse notifications enabled: {}", settings);
			if (settings.secret() == null) {
				LOG.warn("{} is not set: notifications carry no Authorization header", NotifySettings.SECRET_KEY);
			}
		} else {
			this.notifier = null;
			LOG.info("Synapse notifications disabled: {} is not set", NotifySettings.URL_KEY);
		}
	}

	@Hook(Pointcut.STORAGE_PRECOMMIT_RESOURCE_CREATED)
	public void resourceCreated(IBaseResource theResource) {
		observe(theResource, null, Notification.Action.CREATE);
	}

	@Hook(Pointcut.STORAGE_PRECOMMIT_RESOURCE_UPDATED)
	public void resourceUpdated(IBaseResource theOldResource, IBaseResource theNewResource) {
		observe(theNewResource, null, Notification.Action.UPDATE);
	}

	@Hook(Pointcut.STORAGE_PRECOMMIT_RESOURCE_DELETED)
	public void resourceDeleted(IBaseResource theResource, IIdType theIdBeforeDelete) {
		observe(theResource, theIdBeforeDelete, Notification.Action.DELETE);
	}

	public boolean isActive() {
		return notifier != null;
	}

	/** Notifications handed to the sender and not finished yet (for tests). */
	int pendingDeliveries() {
		return notifier == null ? 0 : notifier.inFlight();
	}

	/** Stops the background threads; pending notifications are lost. */
	public void shutdown() {
		if (notifier != null) {
			notifier.close();
		}
	}

	private void observe(IBaseResource resource, IIdType idBeforeDelete, Notification.Action action) {
		if (notifier == null || resource == null) {
			return;
		}
		try {
			if (!settings.reports(resource.fhirType())) {
				return;
			}
			if (action != Notification.Action.DELETE && OriginTag.isOnModuleWrite(resource)) {
				return; // the module's own write: it has nothing to learn from it (deletes still go)
			}
			Notification notification = action == Notification.Action.DELETE
					? Notification.ofDelete(resource, idBeforeDelete)
					: Notification.of(resource, action);
			if (notification == null) {
				return;
			}
			if (TransactionSynchronizationManager.isSynchronizationActive()) {
				AfterCommitBatch.current(transactionKey, notifier).add(notification);
			} else {
				// No transaction to wait for: the change is already stored.
				notifier.submit(notification);
			}
		} catch (RuntimeException | LinkageError e) {
			// Even a broken deployment (e.g. no spring-tx on the class path) must not fail the write.
			LOG.warn("Could not schedule Synapse notification for {}: {}", resource.fhirType(), e.toString());
		}
	}
}
