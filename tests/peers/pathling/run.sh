#!/usr/bin/env bash
# Starts Pathling Server 7.2.0 (installed by .ci/pathling DIR) in the foreground, bound to 127.0.0.1 only:
# FHIR API at http://127.0.0.1:PORT/fhir, health at http://127.0.0.1:MGMT_PORT/actuator/health.
# WORKDIR gets warehouse/default (the Delta tables), staging/ (the only $import source allowed:
# file://WORKDIR/staging/) and spark-tmp/. Wait on the health endpoint (30-45 s on 2 busy cores), never sleep.
# Usage: run.sh DIR PORT MGMT_PORT WORKDIR
#   PATHLING_HEAP (default 2g), JAVA (default: Java 17 if installed, else java on PATH),
#   PATHLING_ALLOWABLE_SOURCES (default file://WORKDIR/staging/; a comma-separated list of plain string
#   prefixes of the $import url).
#   Extra arguments after WORKDIR are passed on as Spring properties (--name=value).
set -euo pipefail
DIR=${1:?usage: run.sh DIR PORT MGMT_PORT WORKDIR}
PORT=${2:?usage: run.sh DIR PORT MGMT_PORT WORKDIR}
MGMT_PORT=${3:?usage: run.sh DIR PORT MGMT_PORT WORKDIR}
WORKDIR=${4:?usage: run.sh DIR PORT MGMT_PORT WORKDIR}
shift 4
[ -d "$DIR/lib" ] || { echo "run.sh: $DIR/lib missing (install with .ci/pathling $DIR)" >&2; exit 1; }
MAIN_JAR=$(ls "$DIR"/lib/fhir-server-*.jar 2>/dev/null | head -1)
[ -n "$MAIN_JAR" ] || { echo "run.sh: no fhir-server jar in $DIR/lib" >&2; exit 1; }
mkdir -p "$WORKDIR/warehouse/default" "$WORKDIR/staging" "$WORKDIR/spark-tmp"
WORKDIR=$(cd "$WORKDIR" && pwd)
if [ -z "${JAVA:-}" ]; then
  if [ -x /usr/lib/jvm/java-17-openjdk-amd64/bin/java ]; then JAVA=/usr/lib/jvm/java-17-openjdk-amd64/bin/java
  else JAVA=java; fi
fi
export SPARK_LOCAL_IP=127.0.0.1   # else Spark logs that it picked the host's non-loopback address
cd "$WORKDIR"   # Spark's default spark-warehouse/ and any stray files land here
# The server's own jar first (as upstream's image orders it), then its dependencies.
exec "$JAVA" -Xmx"${PATHLING_HEAP:-2g}" \
  -Duser.timezone=UTC \
  --add-exports=java.base/sun.nio.ch=ALL-UNNAMED \
  --add-opens=java.base/java.net=ALL-UNNAMED \
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED \
  -Djava.io.tmpdir="$WORKDIR/spark-tmp" \
  -cp "$MAIN_JAR:$DIR/lib/*" \
  au.csiro.pathling.PathlingServer \
  --server.address=127.0.0.1 \
  --server.port="$PORT" \
  --management.server.address=127.0.0.1 \
  --management.server.port="$MGMT_PORT" \
  --pathling.storage.warehouseUrl="file://$WORKDIR/warehouse" \
  --pathling.storage.databaseName=default \
  --pathling.import.allowableSources="${PATHLING_ALLOWABLE_SOURCES:-file://$WORKDIR/staging/}" \
  --pathling.terminology.enabled=false \
  --pathling.auth.enabled=false \
  --spark.master='local[2]' \
  --spark.ui.enabled=false \
  --spark.driver.host=127.0.0.1 \
  --spark.driver.bindAddress=127.0.0.1 \
  --spark.sql.shuffle.partitions=2 \
  --spark.local.dir="$WORKDIR/spark-tmp" \
  "$@"
