"""deploy/systemd and deploy/kubernetes against the code: units that systemd accepts, manifests
that Kubernetes' own schemas accept, and in both only laggard commands, options and settings
that exist, with the worker's probes on the port and path it serves."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from laggard.rules.loader import DEFAULT_RULES, check_file, load_rules
from laggard.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES = ROOT / "deploy" / "kubernetes"
UNITS = ("laggard-worker.service", "laggard-collect-nvml.service", "laggard-collect-dcgm.service")
INSTALLED_LAGGARD = "/opt/laggard/bin/laggard"  # where the units expect the venv (README: Run it as a daemon)
LAGGARD = Path(sys.executable).parent / "laggard"  # this venv's
FIELDS = set(Settings.model_fields)
# Read by laggard/settings.py itself (os.environ), not settings fields.
SETTINGS_LOCATIONS = {"LAGGARD_SECRETS_DIR", "LAGGARD_ENV_FILE"}


def _setting(name: str) -> str | None:
    """`LAGGARD_INFLUX_URL` -> `influx_url` when it is a setting, else None."""
    field = name.removeprefix("LAGGARD_").lower()
    return field if name.startswith("LAGGARD_") and field in FIELDS else None


def _receiver_variables() -> set[str]:
    """LAGGARD_* variables that are not settings but the default rules' webhook URLs (url_env)."""
    return {r.url_env for r in load_rules(DEFAULT_RULES).receivers if r.url_env}


def _runs_with_help(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`laggard ARGS --help` with this venv's laggard: exits 0 only for a real command whose
    options all exist (click parses every option before it acts on --help)."""
    return subprocess.run([str(LAGGARD), *args, "--help"], capture_output=True, text=True, timeout=60)


# --- systemd -------------------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}: systemd keys repeat (Environment=), so not configparser."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def _environment(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    env = {}
    for value in _values(unit, "Environment"):
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def _env_file() -> tuple[dict[str, str], list[str]]:
    """The example /etc/laggard/laggard.env (deploy/systemd/laggard.env.example: `laggard.env` is
    git-ignored): its set variables, and every LAGGARD_* name it
    mentions, commented-out examples included."""
    text = (SYSTEMD / "laggard.env.example").read_text()
    assigned = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            assigned[key.strip()] = value.strip()
    mentioned = re.findall(r"^\s*#?\s*(LAGGARD_[A-Z0-9_]+)=", text, flags=re.M)
    return assigned, mentioned


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` (works unprivileged on files in any folder) finds no unknown key,
    bad value or missing binary; ExecStart points at this venv's laggard in the copy."""
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert INSTALLED_LAGGARD in text, name
        (tmp_path / name).write_text(text.replace(INSTALLED_LAGGARD, str(LAGGARD)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if any(name in line for name in UNITS)]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_verify_would_catch_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing binary are reported."""
    text = (SYSTEMD / "laggard-worker.service").read_text().replace("Restart=on-failure", "Restart=sometimes")
    (tmp_path / "laggard-worker.service").write_text(text)  # ExecStart left at /opt/laggard, absent here
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "laggard-worker.service")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    output = result.stdout + result.stderr
    if Path(INSTALLED_LAGGARD).exists():
        pytest.skip(f"{INSTALLED_LAGGARD} exists on this machine")
    assert result.returncode != 0 and "not executable" in output and "restart specifier" in output, output


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_runs_a_real_laggard_command(name: str) -> None:
    unit = _unit(name)
    (exec_start,) = _values(unit, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_LAGGARD
    expected = {"laggard-worker.service": ["worker"], "laggard-collect-nvml.service": ["collect", "nvml"],
                "laggard-collect-dcgm.service": ["collect", "dcgm"]}[name]
    assert argv[1:1 + len(expected)] == expected
    result = _runs_with_help(argv[1:])
    command = " ".join(argv[1:])
    assert result.returncode == 0, f"{name}: `laggard {command} --help` failed:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_is_a_hardened_daemon_with_its_settings_and_secrets(name: str) -> None:
    unit = _unit(name)
    service = dict(unit["Service"])  # the last value of each key
    assert service["User"] == "laggard" and service["Group"] == "laggard"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["EnvironmentFile"] == "/etc/laggard/laggard.env"
    assert _values(unit, "WantedBy", "Install") == ["multi-user.target"]
    env = _environment(unit)
    assert all(_setting(key) or key in SETTINGS_LOCATIONS for key in env if key.startswith("LAGGARD_")), env
    # Secrets: every file of /etc/laggard/credentials as credential laggard_<file>, read by the
    # settings from $CREDENTIALS_DIRECTORY (%d).
    assert _values(unit, "LoadCredential") == ["laggard:/etc/laggard/credentials"]
    assert env["LAGGARD_SECRETS_DIR"] == "%d"
    if name == "laggard-worker.service":
        # The worker's state (Faust data, alert state, silences) in the one writable folder.
        assert service["StateDirectory"] == "laggard"
        assert env["LAGGARD_STATE_DIR"] == "%S/laggard" and service["WorkingDirectory"] == "%S/laggard"
        assert service["PrivateDevices"] == "yes"
    if name == "laggard-collect-nvml.service":
        # NVML opens /dev/nvidia*: nothing that limits devices (ProtectClock= implies DeviceAllow=char-rtc,
        # and any DeviceAllow= shuts out every device it does not list).
        assert not {"PrivateDevices", "ProtectClock", "DeviceAllow", "DevicePolicy"} & set(service), service


def test_the_credentials_systemd_passes_are_the_settings_secrets(tmp_path: Path) -> None:
    """LoadCredential=laggard:/etc/laggard/credentials names each file's credential
    `laggard_<file>`: the prefixed secret names the settings read."""
    (tmp_path / "laggard_influx_token").write_text("token-from-credential\n")
    (tmp_path / "laggard_kafka_sasl_password").write_text("sasl-from-credential")
    settings = Settings(_secrets_dir=tmp_path)
    assert settings.influx_token is not None and settings.influx_token.get_secret_value() == "token-from-credential"
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "sasl-from-credential"


def test_the_example_env_file_names_only_real_settings() -> None:
    assigned, mentioned = _env_file()
    receivers = _receiver_variables()
    unknown = [name for name in mentioned if not _setting(name) and name not in receivers]
    assert unknown == [], f"deploy/systemd/laggard.env.example names settings the code does not read: {unknown}"
    # The units set these; an EnvironmentFile= value would override them (systemd reads it last).
    assert not {"LAGGARD_STATE_DIR", "LAGGARD_SECRETS_DIR"} & set(mentioned)
    # Its values are valid settings (as laggard would read them), and no secret is in it but webhooks.
    values = {_setting(k): v for k, v in assigned.items() if _setting(k)}
    Settings(**values)
    assert not {"influx_token", "influx_password", "kafka_sasl_password"} & set(values)


def test_the_sysusers_file_creates_the_units_user() -> None:
    line = next(line for line in (SYSTEMD / "laggard.sysusers.conf").read_text().splitlines()
                if line and not line.startswith("#"))
    kind, user, *_ = shlex.split(line)
    assert (kind, user) == ("u", "laggard")


# --- Kubernetes ----------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _resource(kind: str, name: str) -> dict:
    return next(doc for _, doc in _manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def _pods() -> list[tuple[str, dict]]:
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"]) for _, doc in _manifests()
            if doc["kind"] in ("Deployment", "DaemonSet")]


def _container_env(container: dict) -> dict[str, dict | str]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    """kubernetes-validate's bundled schemas (offline), strict: an unknown field is an error."""
    version = kubernetes_validate.latest_version()
    manifests = _manifests()
    assert {doc["kind"] for _, doc in manifests} >= {"Namespace", "ConfigMap", "Secret", "Deployment", "DaemonSet",
                                                     "Service"}
    for filename, doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']}: {path}: {err.message}")
        assert doc["metadata"].get("namespace", "laggard") == "laggard" or doc["kind"] == "Namespace"


def test_the_validator_would_catch_a_bad_manifest() -> None:
    worker = _resource("Deployment", "laggard-worker")
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_applies_the_manifests_but_not_the_example_secret() -> None:
    resources = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    assert all((KUBERNETES / r).is_file() for r in resources)
    assert "secret.example.yaml" not in resources
    assert {"namespace.yaml", "configmap.yaml", "worker.yaml"} <= set(resources)
    images = {image["name"] for image in yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["images"]}
    used = {container["image"].split(":")[0] for _, pod in _pods() for container in pod["containers"]}
    assert used <= images, (used, images)


def test_containers_run_real_laggard_commands() -> None:
    expected = {"laggard-worker": ["worker"], "laggard-collect-nvml": ["collect", "nvml"],
                "laggard-collect-dcgm": ["collect", "dcgm"]}
    pods = _pods()
    assert {name for name, _ in pods} == set(expected)
    for name, pod in pods:
        (container,) = pod["containers"]
        argv = container["command"] + container.get("args", [])
        assert argv[0] == "laggard" and argv[1:1 + len(expected[name])] == expected[name], argv
        env = _container_env(container)
        for ref in re.findall(r"\$\((\w+)\)", " ".join(argv)):  # Kubernetes expands $(VAR) from env
            assert ref in env, f"{name}: $({ref}) is not in the container's env"
        args = [re.sub(r"\$\((\w+)\)", "placeholder", arg) for arg in argv[1:]]
        result = _runs_with_help(args)
        command = " ".join(args)
        assert result.returncode == 0, f"{name}: `laggard {command} --help` failed:\n{result.stdout}{result.stderr}"


def test_manifests_name_only_real_settings() -> None:
    settings_map = _resource("ConfigMap", "laggard-settings")["data"]
    names = list(settings_map)
    for _, pod in _pods():
        for container in pod["containers"]:
            names += [key for key in _container_env(container) if key.startswith("LAGGARD_")]
            assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["laggard-settings"]
    unknown = [name for name in names if not _setting(name) and name not in SETTINGS_LOCATIONS]
    assert unknown == [], f"the manifests set settings the code does not read: {unknown}"
    Settings(**{_setting(k): v for k, v in settings_map.items()})  # valid values too


def test_the_secret_holds_only_settings_and_files_the_config_reads() -> None:
    secret = _resource("Secret", "laggard-secrets")
    keys = set(secret["stringData"])
    rules = yaml.safe_load(_resource("ConfigMap", "laggard-rules")["data"]["rules.yaml"])
    url_files = {Path(r["url_file"]).name for r in rules["receivers"] if "url_file" in r}
    cafile = Path(_resource("ConfigMap", "laggard-settings")["data"]["LAGGARD_KAFKA_SSL_CAFILE"]).name
    assert keys <= FIELDS | url_files | {cafile}, keys
    assert url_files <= keys and cafile in keys
    assert {"influx_token", "kafka_sasl_password"} <= keys


def test_the_worker_probes_and_serves_metrics_where_it_listens() -> None:
    worker = _resource("Deployment", "laggard-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _container_env(container)
    port = Settings(worker_web_port=env["LAGGARD_WORKER_WEB_PORT"]).worker_web_port
    assert env["LAGGARD_WORKER_WEB_HOST"] == "0.0.0.0"  # the kubelet probes the pod's address, not loopback
    (metrics_port,) = container["ports"]
    assert metrics_port["containerPort"] == port and metrics_port["name"] == "metrics"
    # The worker serves these pages (agents/worker.py build_worker).
    pages = set(re.findall(r'@app\.page\("([^"]+)"\)', (ROOT / "agents" / "worker.py").read_text()))
    assert {"/healthz", "/metrics"} <= pages
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/healthz" and http["port"] in ("metrics", port), probe
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] in pages
    service = _resource("Service", "laggard-worker-metrics")
    assert service["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ("metrics", port)


def test_the_worker_keeps_state_rules_and_secrets_where_its_settings_say() -> None:
    pod = _resource("Deployment", "laggard-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _container_env(container)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["LAGGARD_STATE_DIR"]]] or "persistentVolumeClaim" in volumes[
        mounts[env["LAGGARD_STATE_DIR"]]]
    assert volumes[mounts[env["LAGGARD_SECRETS_DIR"]]]["secret"]["secretName"] == "laggard-secrets"
    rules_path = Path(env["LAGGARD_RULES_FILE"])
    rules_volume = volumes[mounts[str(rules_path.parent)]]
    assert rules_volume["configMap"]["name"] == "laggard-rules"
    assert rules_path.name in _resource("ConfigMap", "laggard-rules")["data"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_rules_in_the_configmap_pass_laggard_rules_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(_resource("ConfigMap", "laggard-rules")["data"]["rules.yaml"])
    config, problems = check_file(rules)
    assert problems == [] and config is not None and config.rules
    secrets_dir = _container_env(_resource("Deployment", "laggard-worker")["spec"]["template"]["spec"]
                                 ["containers"][0])["LAGGARD_SECRETS_DIR"]
    assert all(str(r.url_file).startswith(f"{secrets_dir}/") for r in config.receivers if r.url_file)


def test_pods_run_as_non_root_without_privileges() -> None:
    for name, pod in _pods():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"], name


def test_the_collectors_know_their_node() -> None:
    """Both DaemonSets name the node from the downward API; the NVML one gets the GPUs through
    the NVIDIA runtime without requesting (and so taking) them; the dcgm one scrapes its node's exporter."""
    for name in ("laggard-collect-nvml", "laggard-collect-dcgm"):
        pod = _resource("DaemonSet", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = _container_env(container)
        assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        assert container["args"][container["args"].index("--node") + 1] == "$(NODE_NAME)"
        assert "nvidia.com/gpu" not in str(container["resources"])
    nvml = _resource("DaemonSet", "laggard-collect-nvml")["spec"]["template"]["spec"]
    assert nvml["runtimeClassName"] == "nvidia"
    assert _container_env(nvml["containers"][0])["NVIDIA_VISIBLE_DEVICES"] == "all"
    dcgm = _resource("DaemonSet", "laggard-collect-dcgm")["spec"]["template"]["spec"]["containers"][0]
    url = dcgm["args"][dcgm["args"].index("--url") + 1]
    assert url == "http://$(HOST_IP):9400/metrics"
    assert _container_env(dcgm)["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
