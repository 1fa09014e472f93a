package io.fhirsync.testpeer.hapi;

import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.SubscriptionTriggeringProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/** HAPI's RestfulServer at /fhir/*, with the providers HAPI's JPA configuration builds. */
@Configuration
public class FhirServletConfig {

	@Bean
	public RestfulServer restfulServer(
			FhirContext theFhirContext,
			IFhirSystemDao<?, ?> theSystemDao,
			ResourceProviderFactory theResourceProviders,
			IJpaSystemProvider theSystemProvider,
			BulkDataExportProvider theBulkDataExportProvider,
			SubscriptionTriggeringProvider theSubscriptionTriggeringProvider,
			DatabaseBackedPagingProvider thePagingProvider,
			JpaStorageSettings theStorageSettings,
			ISearchParamRegistry theSearchParamRegistry,
			IValidationSupport theValidationSupport) {
		RestfulServer server = new RestfulServer(theFhirContext);
		// read/vread/search/create/update/patch/delete/history for every R4 resource type
		server.registerProviders(theResourceProviders.createProviders());
		// system level: transaction/batch, _history, $meta, ...
		server.registerProvider(theSystemProvider);
		// $export at system, Patient and Group level, and $export-poll-status
		server.registerProvider(theBulkDataExportProvider);
		// $trigger-subscription (the starter always registers it)
		server.registerProvider(theSubscriptionTriggeringProvider);

		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, theSystemDao, theStorageSettings, theSearchParamRegistry, theValidationSupport);
		capabilities.setImplementationDescription("HAPI FHIR R4 Server");
		server.setServerConformanceProvider(capabilities);

		// page search results through the database (HAPI defaults: 10 per page, _count at most 50)
		server.setPagingProvider(thePagingProvider);
		// RestfulServer's own default is XML; the starter (and so every hapiproject/hapi image) sets JSON
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer theServer) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(theServer, "/fhir/*");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
