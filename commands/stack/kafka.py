"""The Apache Kafka broker (KRaft, one combined broker/controller node) from Maven Central.

Maven resolves `org.apache.kafka:kafka_2.13` and its runtime dependencies into a cache folder
(~/.cache/laggard/kafka-<version>, shared by every checkout on the machine), and the broker runs
on the machine's Java 17 as `java -cp <jars> kafka.Kafka server.properties`. Storage is
formatted on first start; its data lives in <state>/kafka/data and survives down/up.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import uuid
from importlib import resources
from pathlib import Path

from laggard.commands.stack.process import ManagedService, StackError, write_private

CACHE_ROOT = Path(os.environ.get("LAGGARD_CACHE_DIR", Path.home() / ".cache" / "laggard"))
# The local SASL listener's one user and what it accepts (production brokers: mostly SCRAM over TLS).
SASL_USER = "laggard"
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-512")


def java_major_version(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    # 'openjdk version "17.0.15" ...' or 'java version "1.8.0_..."'
    quoted = out.split('"')[1] if '"' in out else ""
    parts = quoted.split(".")
    if not parts or not parts[0].isdigit():
        raise StackError(f"could not read the Java version from `{java} -version`: {out.strip()[:200]}")
    return int(parts[1]) if parts[0] == "1" else int(parts[0])


class KafkaBroker(ManagedService):
    name = "kafka"
    start_timeout_s = 90.0

    def __init__(self, state_dir: Path, port: int, controller_port: int, version: str,
                 tls_port: int | None = None, sasl_port: int | None = None) -> None:
        super().__init__(state_dir, port)
        self.controller_port = controller_port
        self.version = version
        self.libs = CACHE_ROOT / f"kafka-{version}" / "libs"
        self.tls_port = tls_port
        self.sasl_port = sasl_port

    @property
    def sasl_password_file(self) -> Path:
        """The SASL listener's password for user SASL_USER (random, made once, mode 600)."""
        return self.home / "sasl" / "password"

    def _sasl_config(self) -> list[str]:
        """A SASL_SSL listener (the TLS certificate above) taking PLAIN and SCRAM-SHA-512 for one
        user; PLAIN's user list is in the JAAS line, SCRAM's credential is stored by after_start."""
        if not self.sasl_password_file.exists():
            self.sasl_password_file.parent.mkdir(parents=True, exist_ok=True)
            write_private(self.sasl_password_file, secrets.token_hex(16))
        password = self.sasl_password_file.read_text()
        return [
            f"sasl.enabled.mechanisms={','.join(SASL_MECHANISMS)}",
            "listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule"
            f' required user_{SASL_USER}="{password}";',
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        ]

    def after_start(self) -> None:
        """Store the SCRAM credential (an idempotent upsert, over the plaintext listener)."""
        if not self.sasl_port:
            return
        from kafka import KafkaAdminClient
        from kafka.admin import UserScramCredentialUpsertion

        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{self.port}", client_id="laggard-stack-sasl")
        try:
            upsert = UserScramCredentialUpsertion(SASL_USER, "SCRAM-SHA-512", self.sasl_password_file.read_text())
            errors = admin.alter_user_scram_credentials([upsert])
            if errors.get(SASL_USER):
                raise StackError(f"kafka: storing the SCRAM credential of {SASL_USER} failed: {errors[SASL_USER]}")
        finally:
            admin.close()

    @property
    def tls_ca(self) -> Path:
        """The TLS listener's self-signed certificate (PEM): clients' `ssl_cafile`."""
        return self.home / "tls" / "ca.pem"

    def _tls_config(self) -> list[str]:
        """A TLS listener with a self-signed certificate for 127.0.0.1 made by keytool (from the
        JDK that runs the broker); its keystore password is random and stays in the state folder."""
        tls = self.home / "tls"
        keystore, password_file = tls / "broker.p12", tls / "keystore-password"
        if not self.tls_ca.exists():  # written last: a failed attempt starts over
            tls.mkdir(parents=True, exist_ok=True)
            keystore.unlink(missing_ok=True)
            password = secrets.token_hex(16)
            write_private(password_file, password)
            keytool = str(Path(self._java()).resolve().parent / "keytool")
            for args in (["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity",
                          "3650", "-dname", "CN=localhost", "-ext", "SAN=IP:127.0.0.1,DNS:localhost"],
                         ["-exportcert", "-rfc", "-alias", "broker", "-file", str(self.tls_ca)]):
                result = subprocess.run([keytool, *args, "-keystore", str(keystore), "-storetype", "PKCS12",
                                         "-storepass", password], capture_output=True, text=True, timeout=60)
                if result.returncode != 0:
                    raise StackError(f"kafka: keytool {args[0]} failed for the TLS listener:\n{result.stderr}")
        password = password_file.read_text()
        return [f"ssl.keystore.location={keystore}", "ssl.keystore.type=PKCS12",
                f"ssl.keystore.password={password}", f"ssl.key.password={password}"]

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    def marker(self) -> str:
        return str(self.config_path)

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError(
                "kafka: no `java` on PATH. The broker needs Java 17 or newer: "
                "apt-get install -y openjdk-17-jre-headless (or set PATH to a JDK 17+)."
            )
        major = java_major_version(java)
        if major < 17:
            raise StackError(f"kafka: Java {major} found at {java}; Kafka 4 needs Java 17 or newer.")
        return java

    def resolve(self) -> None:
        """Fetch the broker's jars with Maven once per version (a marker file says it finished)."""
        done = self.libs / ".resolved"
        if done.exists():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "kafka: no `mvn` on PATH. Maven resolves the broker from Maven Central: "
                "apt-get install -y maven."
            )
        self.libs.mkdir(parents=True, exist_ok=True)
        with resources.as_file(resources.files("laggard.commands.stack") / "pom.xml") as pom:
            result = subprocess.run(
                [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                 f"-Dkafka.version={self.version}", f"-DoutputDirectory={self.libs}",
                 "-DincludeScope=runtime"],
                capture_output=True, text=True, timeout=900,
            )
        if result.returncode != 0 or not any(self.libs.glob(f"kafka_2.13-{self.version}.jar")):
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise StackError(
                f"kafka: Maven could not resolve org.apache.kafka:kafka_2.13:{self.version} from "
                f"Maven Central (exit {result.returncode}). Check network access to Maven Central "
                f"and ~/.m2/settings.xml, or set LAGGARD_KAFKA_VERSION.\n{tail}"
            )
        done.write_text(self.version)

    def write_config(self) -> None:
        log4j = self.home / "log4j2.properties"
        log4j.write_text((resources.files("laggard.commands.stack") / "log4j2.properties").read_text())
        tls = (f",SSL://127.0.0.1:{self.tls_port}" if self.tls_port else "") + (
            f",SASL_SSL://127.0.0.1:{self.sasl_port}" if self.sasl_port else "")
        write_private(self.config_path, "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}{tls}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}{tls}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL",
            *(self._tls_config() if self.tls_port or self.sasl_port else []),
            *(self._sasl_config() if self.sasl_port else []),
            f"log.dirs={self.data_dir}",
            "num.partitions=8",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            # One local node: no reason to delay the first rebalance.
            "group.initial.rebalance.delay.ms=0",
            "message.max.bytes=10485760",
            "log.retention.hours=168",
            "",
        ]))

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def prepare(self) -> None:
        java = self._java()
        self.resolve()
        self.write_config()
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's own ids: a leading "-" reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        result = subprocess.run(
            [java, "-cp", self._classpath(), f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
             "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config_path)],
            capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise StackError(f"kafka: formatting storage in {self.data_dir} failed:\n{result.stdout}{result.stderr}")

    def command(self) -> list[str]:
        return [
            self._java(), "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", self._classpath(), "kafka.Kafka", str(self.config_path),
        ]

    def healthy(self) -> bool:
        """A real metadata request through kafka-python."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=f"127.0.0.1:{self.port}", request_timeout_ms=3000,
                client_id="laggard-stack-health",
            )
        except (KafkaError, OSError, ValueError):
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()
