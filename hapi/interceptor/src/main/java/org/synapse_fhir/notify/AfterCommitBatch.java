package org.synapse_fhir.notify;

import org.slf4j.LoggerFactory;
import org.springframework.transaction.support.TransactionSynchronization;
import org.springframework.transaction.support.TransactionSynchronizationManager;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The notifications of one Spring transaction, handed to the {@link Notifier} only once it has
 * committed. One entry per resource: a later change of the same resource in the same transaction
 * replaces the earlier one, so the receiver hears of the last version only.
 */
final class AfterCommitBatch implements TransactionSynchronization {

	private final Object key;
	private final Notifier notifier;
	private final Map<String, Notification> pending = new LinkedHashMap<>();

	private AfterCommitBatch(Object key, Notifier notifier) {
		this.key = key;
		this.notifier = notifier;
	}

	/**
	 * The batch bound to the current transaction under {@code key}, created and registered on
	 * first use. Call only while transaction synchronization is active.
	 */
	static AfterCommitBatch current(Object key, Notifier notifier) {
		AfterCommitBatch batch = (AfterCommitBatch) TransactionSynchronizationManager.getResource(key);
		if (batch == null) {
			batch = new AfterCommitBatch(key, notifier);
			TransactionSynchronizationManager.registerSynchronization(batch);
			TransactionSynchronizationManager.bindResource(key, batch);
		}
		return batch;
	}

	void add(Notification notification) {
		// remove + put: the map keeps the order of each resource's last change.
		pending.remove(notification.resourceKey());
		pending.put(notification.resourceKey(), notification);
	}

	// An inner REQUIRES_NEW transaction suspends ours: hide the batch so the inner one gets its own.
	@Override
	public void suspend() {
		TransactionSynchronizationManager.unbindResourceIfPossible(key);
	}

	@Override
	public void resume() {
		TransactionSynchronizationManager.bindResource(key, this);
	}

	@Override
	public void afterCommit() {
		// An exception here would reach the writer although its data is committed: never throw.
		try {
			pending.values().forEach(notifier::submit);
		} catch (RuntimeException e) {
			LoggerFactory.getLogger(AfterCommitBatch.class).warn("Could not hand over notifications: {}", e.toString());
		}
	}

	@Override
	public void afterCompletion(int status) {
		// Runs after commit and after rollback alike; on rollback nothing was submitted.
		TransactionSynchronizationManager.unbindResourceIfPossible(key);
		pending.clear();
	}
}
