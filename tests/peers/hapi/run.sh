#!/usr/bin/env bash
# Starts the HAPI FHIR JPA test peer built by .ci/hapi DIR, in the foreground, on http://127.0.0.1:PORT/fhir
# (in-memory H2: every start is an empty server). Extra arguments are Spring properties, e.g.
# --spring.datasource.url=jdbc:h2:file:/abs/path/h2 to keep data, or --testpeer.job-fast-tracking=true (see
# FINDINGS.md). Heap: HAPI_HEAP (default 1g). Ready when GET /fhir/metadata answers 200 (1.5-3 min on 2 cores).
# Usage: tests/peers/hapi/run.sh DIR PORT [--spring.property=value ...]
set -euo pipefail
DIR=${1:?usage: run.sh DIR PORT}
PORT=${2:?usage: run.sh DIR PORT}
shift 2
JAR="$DIR/hapi-test-peer.jar"
[ -f "$JAR" ] || { echo "run.sh: $JAR missing: build it with .ci/hapi $DIR" >&2; exit 1; }
exec java -Xmx${HAPI_HEAP:-1g} -Djava.net.preferIPv4Stack=true -Duser.timezone=UTC \
  -jar "$JAR" --server.address=127.0.0.1 --server.port="$PORT" "$@"
