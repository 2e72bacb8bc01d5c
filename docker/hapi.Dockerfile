# synapse-fhir-hapi:0.1.0 — the official HAPI FHIR JPA server image built from HAPI 8.8.0 (the
# version the shim is compiled against, hapi/pom.xml) with the notify shim on its class path.
# Build from the repository root:  docker build -f docker/hapi.Dockerfile -t synapse-fhir-hapi:0.1.0 .
# (No Docker engine ran here; what was checked instead: docs/deployment.md, "Docker Compose".)

# The shim jar, built from source (no host-side Maven), and a tiny health-check client: the
# official image is distroless (no shell, no curl), but it has java.
FROM maven:3.9.12-eclipse-temurin-17 AS shim
WORKDIR /build
COPY hapi/pom.xml hapi/pom.xml
COPY hapi/interceptor hapi/interceptor
# The reactor reads every module's pom; only the interceptor is built.
COPY hapi/server/pom.xml hapi/server/pom.xml
RUN mvn -B -ntp -f hapi/pom.xml -pl interceptor package -DskipTests
COPY docker/HapiHealthCheck.java /build/
RUN javac --release 17 -d /build/healthcheck /build/HapiHealthCheck.java

# hapiproject/hapi v8.8.0-1: the image of hapi-fhir-jpaserver-starter's tag image/v8.8.0-1, whose
# parent is hapi-fhir 8.8.0 (its Helm chart pins this digest).
FROM hapiproject/hapi:v8.8.0-1@sha256:34c86fd5805df77c2b9d9c10538050b16ac3dc244352da0ebe4717f931330775
# /app/extra-classes is on the image's loader.path (Spring Boot's PropertiesLauncher).
COPY --from=shim /build/hapi/interceptor/target/synapse-notify-interceptor.jar /app/extra-classes/
COPY --from=shim /build/healthcheck /app/healthcheck
# The starter registers the shim; searches are never answered from a cache (a search right
# after a write sees it); clients may choose ids (server-assigned ones are then UUIDs). As the
# HAPI dev server the tests use. SYNAPSE_NOTIFY_URL and SYNAPSE_NOTIFY_SECRET come at run time.
ENV hapi.fhir.custom-interceptor-classes=org.synapse_fhir.notify.SynapseNotifyInterceptor \
    hapi.fhir.reuse_cached_search_results_millis=0 \
    hapi.fhir.client_id_strategy=ANY
HEALTHCHECK --start-period=300s --interval=30s --timeout=10s --retries=5 \
    CMD ["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx32m", "-cp", "/app/healthcheck", "HapiHealthCheck", "http://127.0.0.1:8080/fhir/metadata"]
