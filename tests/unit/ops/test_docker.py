"""docker/compose.yml runs the topology of topology.toml (no Docker here: parse and compare)."""

from __future__ import annotations

import json

import yaml

from pipeline.ops import topology
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.contract import config_from_namespace, config_parser, load_group

COMPOSE = yaml.safe_load((REPO_ROOT / "docker" / "compose.yml").read_text())
TOPOLOGY = topology.load(REPO_ROOT / "topology.toml")
SERVICES = COMPOSE["services"]
INFRA = {"kafka", "registry", "init"}
MONITORING = {"metrics", "prometheus", "grafana"}
DOCKER = REPO_ROOT / "docker"


def test_every_process_of_the_topology_is_a_service_and_nothing_else():
    assert set(SERVICES) == INFRA | MONITORING | {"producer"} | {
        p.name for p in TOPOLOGY.processes}


def test_services_run_what_the_topology_runs_with_the_same_arguments():
    for proc in TOPOLOGY.processes:
        service = SERVICES[proc.name]
        line = [*service.get("entrypoint", []), *service.get("command", [])]
        if proc.is_user_group:
            assert line[:2] == ["run", proc.run] and json.loads(line[line.index("--args") + 1]) \
                == proc.args
        else:
            # the group's own command line (its Config's flags) gives each setting of the
            # topology's args the same value
            assert line[:3] == ["python", "-m", proc.run]
            group = load_group(proc.run)
            parsed = config_parser(group.config, proc.run).parse_args(line[3:])
            assert parsed.namespace == str(TOPOLOGY.namespace)
            config = config_from_namespace(group.config, parsed)
            assert proc.args, proc.name
            for key in proc.args:
                assert getattr(config, key) == getattr(proc.config, key), f"{proc.name} {key}"


def test_namespace_symbols_and_source_agree():
    ns = str(TOPOLOGY.namespace)
    producer = SERVICES["producer"]["command"]
    assert producer[producer.index("-n") + 1] == ns
    assert producer[producer.index("--url") + 1] == TOPOLOGY.source.url
    assert producer[producer.index("--symbols") + 1].split(",") == list(TOPOLOGY.symbols)
    assert f"-n {ns}" in " ".join(SERVICES["init"]["entrypoint"])
    for name, service in SERVICES.items():
        if name in ("kafka", "registry"):
            continue
        line = service.get("entrypoint", []) + service.get("command", [])
        if "--namespace" in line:
            assert line[line.index("--namespace") + 1] == ns, name


def test_the_environment_points_every_process_at_the_same_broker_and_registry():
    env = COMPOSE["x-pipeline"]["environment"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["SCHEMA_REGISTRY_URL"] == "http://registry:8080/apis/ccompat/v7"
    assert env["PIPELINE_NAMESPACE"] == str(TOPOLOGY.namespace)
    kafka = SERVICES["kafka"]["environment"]
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from the catalog"
    registry = SERVICES["registry"]["environment"]
    assert registry["APICURIO_KAFKASQL_BOOTSTRAP_SERVERS"] == "kafka:9092"
    for name, service in SERVICES.items():
        line = service.get("entrypoint", []) + service.get("command", [])
        if "--bootstrap" in line:
            assert line[line.index("--bootstrap") + 1] == env["KAFKA_BOOTSTRAP_SERVERS"], name
            assert line[line.index("--registry") + 1] == env["SCHEMA_REGISTRY_URL"], name


def test_images_match_the_versions_the_pipeline_runs_locally():
    from pipeline.ops.broker import kafka_version
    from pipeline.ops.registry_server import apicurio_version

    assert SERVICES["kafka"]["image"] == f"apache/kafka:{kafka_version()}"
    assert SERVICES["registry"]["image"] == f"apicurio/apicurio-registry:{apicurio_version()}"
    for port in (p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])):
        assert port == "127.0.0.1", "ports listen on loopback only"


def mounts(service: str) -> dict[str, str]:
    """Container path -> host path (relative to docker/, where compose.yml is) of the binds."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            assert (DOCKER / source).exists(), f"{service} mounts {source}, which is missing"
            out[target] = source
    return out


def test_the_metrics_service_serves_the_namespace_prometheus_scrapes():
    metrics = SERVICES["metrics"]
    line = metrics["command"]
    assert line[0] == "metrics" and line[line.index("--host") + 1] == "0.0.0.0"
    port = line[line.index("--port") + 1]
    assert metrics["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert metrics["environment"] == COMPOSE["x-pipeline"]["environment"], "the same cluster"
    execution = SERVICES["execution"]["command"]
    assert line[line.index("--execution-mode") + 1] == execution[execution.index("--mode") + 1]
    prometheus = SERVICES["prometheus"]
    assert prometheus["image"] == "prom/prometheus:v3.5.0"
    assert prometheus["depends_on"] == ["metrics"]
    assert mounts("prometheus") == {"/etc/prometheus/prometheus.yml": "./prometheus/prometheus.yml"}
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"metrics:{port}"]}]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard():
    grafana = SERVICES["grafana"]
    assert grafana["image"] == "grafana/grafana:12.1.1"
    assert grafana["depends_on"] == ["prometheus"] and grafana["ports"] == ["127.0.0.1:3000:3000"]
    binds = mounts("grafana")
    assert binds["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provisioning = DOCKER / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "pipeline.yml").read_text())[
        "providers"]
    dashboards = provider["options"]["path"]
    assert binds[dashboards] == "./grafana/dashboards"
    assert (DOCKER / "grafana" / "dashboards" / "pipeline.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards}/pipeline.json"
    assert {"prometheus-data", "grafana-data"} <= set(COMPOSE["volumes"])
