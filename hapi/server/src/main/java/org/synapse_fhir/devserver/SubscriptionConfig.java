package org.synapse_fhir.devserver;

import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import org.hl7.fhir.dstu2.model.Subscription;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;

/**
 * REST-hook subscriptions, matched and delivered in this process (in-memory broker).
 *
 * <p>HAPI stores each change and a scheduled job feeds the stored changes to the matcher every
 * {@code fhir.subscription.matching-interval-ms} (HAPI's default is 5000 ms; ours 1000 ms).
 */
@Configuration
@Import({SubscriptionSubmitterConfig.class, SubscriptionProcessorConfig.class, SubscriptionChannelConfig.class})
public class SubscriptionConfig {

	@Bean
	public SubscriptionSettings subscriptionSettings(
			@Value("${fhir.subscription.matching-interval-ms:1000}") long matchingIntervalMs) {
		SubscriptionSettings settings = new SubscriptionSettings();
		settings.addSupportedSubscriptionType(Subscription.SubscriptionChannelType.RESTHOOK);
		settings.setSubscriptionIntervalInMs(matchingIntervalMs);
		// A new or changed Subscription takes effect without waiting for the job.
		settings.setSubscriptionChangeQueuedImmediately(true);
		return settings;
	}

	/** Required by HAPI's delivery wiring; e-mail subscriptions are not enabled here. */
	@Bean
	public IEmailSender emailSender() {
		return details -> {};
	}
}
