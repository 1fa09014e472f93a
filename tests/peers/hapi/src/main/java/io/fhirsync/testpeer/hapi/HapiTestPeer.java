package io.fhirsync.testpeer.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration;
import org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration;
import org.springframework.context.annotation.Import;

/**
 * A HAPI FHIR JPA server (R4 on H2) made only of HAPI's own Spring configurations, wired the way
 * hapi-fhir-jpaserver-starter wires them, minus everything fhirsync does not talk to (MDM, CR, IPS,
 * CDS hooks, the web tester, Elasticsearch, email/websocket subscriptions).
 *
 * <p>Storage beans (settings, entity manager, transactions) are in {@link StorageConfig}; the FHIR
 * servlet at /fhir/* is in {@link FhirServletConfig}. Both are picked up by component scanning.
 */
@SpringBootApplication(
		exclude = {
			// HAPI runs its own Quartz schedulers (HapiSchedulerServiceImpl); Boot's would be an idle extra.
			QuartzAutoConfiguration.class,
			// no Elasticsearch here (the starter excludes this too)
			ElasticsearchRestClientAutoConfiguration.class,
			// no web pages (HAPI uses Thymeleaf only for narratives; the starter excludes this too)
			ThymeleafAutoConfiguration.class
		})
@Import({
	// the JPA server: FhirContext, DAOs and resource providers for every R4 type, system DAO/provider,
	// search, $export provider bean, scheduler
	JpaR4Config.class,
	// full-text service stub, stale-search cleanup, database-backed paging, resource counts
	HapiJpaConfig.class,
	// subscriptions: submitter (interceptor that queues changes) + processor (matching and delivery)
	// over the in-memory (LinkedBlockingQueue) channel, all in this one process
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class,
	// batch2 job framework on JPA, and its job definitions (bulk export among them)
	JpaBatch2Config.class,
	Batch2JobsConfig.class
})
public class HapiTestPeer {
	public static void main(String[] args) {
		SpringApplication.run(HapiTestPeer.class, args);
	}
}
