package io.fhirsync.testpeer.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import jakarta.persistence.EntityManagerFactory;
import org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy;
import org.hibernate.cfg.AvailableSettings;
import org.hibernate.search.mapper.orm.cfg.HibernateOrmMapperSettings;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.orm.jpa.hibernate.SpringImplicitNamingStrategy;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import java.util.HashMap;
import java.util.Map;
import javax.sql.DataSource;

/**
 * The beans HAPI's configurations expect the application to supply. Every setting is HAPI's library
 * default except where a comment says otherwise.
 */
@Configuration
@EnableTransactionManagement
@Import(ThreadPoolFactoryConfig.class)
public class StorageConfig {

	/**
	 * Library defaults: delete enabled, expunge disabled, resource history kept, client ids must be
	 * alphanumeric (not purely numeric), identical bulk-export requests reuse an earlier job, bulk
	 * export files kept 2 h, searches cached and reused for 60 s.
	 *
	 * <p>{@code --testpeer.job-fast-tracking=true} turns on HAPI's own JobFastTrackingEnabled ("useful for
	 * testing", off by default in HAPI): a batch2 job whose steps each produce one work chunk moves to its
	 * next step at once instead of at the next once-a-minute maintenance pass, so a small $export takes
	 * seconds instead of about 3 minutes.
	 */
	@Bean
	public JpaStorageSettings jpaStorageSettings(
			@Value("${testpeer.job-fast-tracking:false}") boolean theJobFastTracking) {
		JpaStorageSettings settings = new JpaStorageSettings();
		settings.setJobFastTrackingEnabled(theJobFastTracking);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings(); // partitioning off
	}

	/**
	 * Rest-hook is the only channel type switched on (hapi.fhir.subscription.resthook_enabled in the
	 * starter). The endpoint URL check is HAPI's default regex, which accepts http://127.0.0.1:PORT/...
	 */
	@Bean
	public SubscriptionSettings subscriptionSettings() {
		SubscriptionSettings settings = new SubscriptionSettings();
		settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		return settings;
	}

	/** The subscription processor needs a sender even with email subscriptions off (as in the starter). */
	@Bean
	public IEmailSender emailSender() {
		return theDetails -> {};
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory theBeanFactory,
			FhirContext theFhirContext,
			JpaStorageSettings theStorageSettings,
			DataSource theDataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(theBeanFactory, theFhirContext, theStorageSettings);
		Map<String, Object> props = new HashMap<>();
		// HibernatePropertiesProvider reads the dialect from here
		props.put(AvailableSettings.DIALECT, HapiFhirH2Dialect.class.getName());
		props.put(AvailableSettings.HBM2DDL_AUTO, "update"); // create the schema in the fresh H2 database
		props.put(AvailableSettings.SCANNER, "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		// Spring Boot's naming, as the starter uses
		props.put(AvailableSettings.IMPLICIT_NAMING_STRATEGY, SpringImplicitNamingStrategy.class.getName());
		props.put(AvailableSettings.PHYSICAL_NAMING_STRATEGY, CamelCaseToUnderscoresNamingStrategy.class.getName());
		props.put(AvailableSettings.USE_SECOND_LEVEL_CACHE, "false");
		props.put(AvailableSettings.USE_QUERY_CACHE, "false");
		// no Hibernate Search (Lucene/Elasticsearch) indexing: plain JPA search
		props.put(HibernateOrmMapperSettings.ENABLED, "false");
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setJpaPropertyMap(props);
		factory.setDataSource(theDataSource);
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory theEntityManagerFactory) {
		return new JpaTransactionManager(theEntityManagerFactory);
	}
}
