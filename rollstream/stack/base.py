"""What every local-stack service provides: install, start, health, stop."""

from __future__ import annotations

import abc
from pathlib import Path

from rollstream.settings import StackSettings
from rollstream.stack.process import ManagedProcess, require_tool, run_checked

POM_TEMPLATE = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.rollstream.stack</groupId>
  <artifactId>{name}-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""


class Service(abc.ABC):
    """One service of the local stack."""

    name: str

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.process = ManagedProcess(self.name, settings.state_dir)

    @property
    @abc.abstractmethod
    def port(self) -> int: ...

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where clients reach the service."""

    @abc.abstractmethod
    def installed(self) -> bool: ...

    @abc.abstractmethod
    def install(self) -> None:
        """Download what the service needs into the cache (first use only)."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def healthy(self) -> bool:
        """A real request answered by the service."""

    startup_timeout: float = 120.0

    @property
    def ports(self) -> list[int]:
        """Every port the service listens on (checked free before it starts)."""
        return [self.port]

    @property
    def data_dir(self) -> Path:
        return self.settings.state_dir / "data" / self.name

    def maven_fetch(self, target: Path, coordinates: list[str]) -> Path:
        """Copy ``group:artifact:version`` and their runtime deps into ``target/libs``."""
        libs = target / "libs"
        marker = target / ".complete"
        if marker.exists():
            return libs
        mvn = require_tool("mvn")
        require_tool("java")
        target.mkdir(parents=True, exist_ok=True)
        deps = "\n".join(
            "    <dependency><groupId>{}</groupId><artifactId>{}</artifactId><version>{}</version></dependency>".format(
                *c.split(":")
            )
            for c in coordinates
        )
        (target / "pom.xml").write_text(POM_TEMPLATE.format(name=self.name, dependencies=deps))
        run_checked(
            [
                mvn, "-B", "-q", "-f", str(target / "pom.xml"),
                f"-Dmaven.repo.local={self.settings.home / 'm2'}",
                "dependency:copy-dependencies", "-DincludeScope=runtime",
                f"-DoutputDirectory={libs}",
            ],
            f"downloading {', '.join(coordinates)} with Maven",
            self.settings.state_dir / "logs" / "install.log",
        )
        marker.touch()
        return libs
