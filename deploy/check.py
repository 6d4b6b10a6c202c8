"""Checks deploy/: renders every kustomize overlay with a real kustomize (kubectl's), validates
every rendered manifest offline against the Kubernetes schemas (kubernetes-validate, strict),
checks the project's own rules on what an overlay deploys, and proves with deliberately broken
copies that each rule and the schema validation do catch what they are for.

Run it through deploy/check, which installs the tools; it prints every check and ends with
`deploy-check: N passed, M failed`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import ipaddress
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable

import yaml

import kubernetes_validate
import kubernetes_validate.utils as kv

Doc = dict[str, Any]

# The settings the services read, with their defaults (README's settings tables).
DEFAULTS = {
    "AUTH_DRAIN_DELAY": "0s",
    "AUTH_SHUTDOWN_GRACE": "20s",
    "API_DRAIN_DELAY": "0s",
    "API_SHUTDOWN_GRACE": "20s",
    "AUTH_GRPC_ADDR": "127.0.0.1:50051",
    "AUTH_METRICS_ADDR": "127.0.0.1:9101",
    "API_HTTP_ADDR": "127.0.0.1:8080",
    "API_METRICS_ADDR": "127.0.0.1:9102",
}
# What a committed Secret may hold: nothing, or the placeholder a team replaces.
PLACEHOLDERS = {"", "CHANGE-ME"}
# Pods allowed to reach auth-service's gRPC port (by label).
AUTH_CLIENT_LABELS = [
    {"app.kubernetes.io/name": "api-service"},
    {"wxauth/auth-client": "true"},
]
AUTH_HEALTH_SERVICE = "wxauth.v1.AuthService"
# Overlays that need no high availability (one replica each).
SINGLE_REPLICA_OVERLAYS = {"local"}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, problems: list[str]) -> None:
        self.failed += 1
        print(f"  FAIL  {what}")
        for p in problems:
            print(f"          - {p}")

    def check(self, what: str, problems: list[str]) -> None:
        if problems:
            self.fail(what, problems)
        else:
            self.ok(what)


# ---------------------------------------------------------------------------------------
# Rendering


def materialize(k8s: Path, into: Path) -> list[str]:
    """Copies deploy/k8s to `into`, leaving out real secret files, and makes each overlay's
    `*.secrets.env` from its committed `.example`: the render sees only committed files."""
    problems = []
    shutil.copytree(k8s, into, ignore=shutil.ignore_patterns("*.secrets.env"))
    for example in sorted(into.glob("overlays/*/*.secrets.env.example")):
        example.with_suffix("").write_bytes(example.read_bytes())
    for kustomization in sorted(into.glob("overlays/*/kustomization.yaml")):
        k = yaml.safe_load(kustomization.read_text())
        for gen in k.get("secretGenerator") or []:
            for env in gen.get("envs") or []:
                if not (kustomization.parent / f"{env}.example").exists():
                    problems.append(
                        f"{kustomization.parent.name}: secretGenerator {gen.get('name')} reads "
                        f"{env} but there is no {env}.example beside it"
                    )
            if gen.get("literals") or gen.get("files"):
                problems.append(
                    f"{kustomization.parent.name}: secretGenerator {gen.get('name')} has "
                    "literals or files: secrets come from git-ignored env files only"
                )
    return problems


def render(kubectl: str, directory: Path) -> list[Doc]:
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory.name} failed:\n{out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# ---------------------------------------------------------------------------------------
# Schema validation


@functools.lru_cache(maxsize=None)
def _schema_contents(filename: str, desired_version: str) -> Any:
    return _original_schema_contents(filename, desired_version)


_original_schema_contents = kv.schema_contents
# The schemas are large and the same for every document: read each once.
kv.schema_contents = _schema_contents


def schema_problems(docs: list[Doc], versions: list[str]) -> list[str]:
    problems = []
    for doc in docs:
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{kind_name(doc)} against {version}: {path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                problems.append(f"{kind_name(doc)}: {e.message}")
            except Exception as e:  # noqa: BLE001 - any failure to validate is a failure
                problems.append(f"{kind_name(doc)} against {version}: {e}")
    return problems


# ---------------------------------------------------------------------------------------
# Reading rendered documents


def kind_name(doc: Doc) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in of_kind(docs, kind) if d["metadata"].get("name") == name), None)


def pod_labels(dep: Doc) -> dict[str, str]:
    return ((dep["spec"]["template"].get("metadata") or {}).get("labels")) or {}


def selects(match_labels: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def containers(dep: Doc) -> list[Doc]:
    return dep["spec"]["template"]["spec"].get("containers") or []


def container_env(docs: list[Doc], c: Doc) -> tuple[dict[str, str], list[str]]:
    """The environment a container gets from envFrom and env (values decoded)."""
    env: dict[str, str] = {}
    problems = []
    for source in c.get("envFrom") or []:
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            cm = named(docs, "ConfigMap", name)
            if cm is None:
                problems.append(f"container {c['name']}: ConfigMap {name} is not in the render")
                continue
            env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
        elif "secretRef" in source:
            name = source["secretRef"]["name"]
            secret = named(docs, "Secret", name)
            if secret is None:
                problems.append(f"container {c['name']}: Secret {name} is not in the render")
                continue
            env.update(secret_values(secret))
    for var in c.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env, problems


def secret_values(secret: Doc) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.get("data") or {}).items()}
    values.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    return values


UNITS = {
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}


def seconds(value: str) -> float:
    """A humantime duration ("5s", "500ms", "1m 30s") in seconds."""
    parts = re.findall(r"(\d+)\s*([a-z]+)", value.strip())
    if not parts or re.sub(r"[\d\sa-z]", "", value.strip()) or any(u not in UNITS for _, u in parts):
        raise ValueError(f"not a duration: {value!r}")
    return sum(int(n) * UNITS[u] for n, u in parts)


def port_of(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def container_port(c: Doc, name_or_number: Any) -> int | None:
    for p in c.get("ports") or []:
        if name_or_number in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def service_of(dep: Doc) -> str:
    return dep["metadata"]["name"]


# What each service's settings are called.
SETTINGS = {
    "auth-service": {"listen": "AUTH_GRPC_ADDR", "metrics": "AUTH_METRICS_ADDR",
                     "drain": "AUTH_DRAIN_DELAY", "grace": "AUTH_SHUTDOWN_GRACE", "port": "grpc"},
    "api-service": {"listen": "API_HTTP_ADDR", "metrics": "API_METRICS_ADDR",
                    "drain": "API_DRAIN_DELAY", "grace": "API_SHUTDOWN_GRACE", "port": "http"},
}


def setting(env: dict[str, str], name: str) -> str:
    return env.get(name) or DEFAULTS[name]


# ---------------------------------------------------------------------------------------
# The rules. Each takes an overlay's rendered documents and answers its problems.


def rule_deployments(docs: list[Doc], overlay: str) -> list[str]:
    names = sorted(d["metadata"]["name"] for d in of_kind(docs, "Deployment"))
    if names != ["api-service", "auth-service"]:
        return [f"expected the Deployments api-service and auth-service, found {names}"]
    return []


def rule_env(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        for c in containers(dep):
            problems += [f"{kind_name(dep)}: {p}" for p in container_env(docs, c)[1]]
    return problems


def rule_listen(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        names = SETTINGS.get(service_of(dep))
        if names is None:
            continue
        for c in containers(dep):
            env, _ = container_env(docs, c)
            for key, port_name in ((names["listen"], names["port"]), (names["metrics"], "metrics")):
                if key not in env:
                    problems.append(f"{kind_name(dep)}: {key} is not set (its default listens on loopback)")
                    continue
                host, port = port_of(env[key])
                if ipaddress.ip_address(host) not in (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")):
                    problems.append(f"{kind_name(dep)}: {key}={env[key]} does not listen on every interface")
                if container_port(c, port_name) != port:
                    problems.append(f"{kind_name(dep)}: {key} port {port} is not the containerPort named {port_name}")
    return problems


def rule_probes(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        svc = service_of(dep)
        for c in containers(dep):
            where = f"{kind_name(dep)} container {c['name']}"
            ready, live = c.get("readinessProbe"), c.get("livenessProbe")
            if not ready:
                problems.append(f"{where}: no readinessProbe")
            if not live:
                problems.append(f"{where}: no livenessProbe")
            if not ready or not live or svc not in SETTINGS:
                continue
            env, _ = container_env(docs, c)
            _, port = port_of(setting(env, SETTINGS[svc]["listen"]))
            if svc == "auth-service":
                for probe, kind, want in ((ready, "readiness", AUTH_HEALTH_SERVICE), (live, "liveness", "")):
                    grpc = probe.get("grpc")
                    if not grpc:
                        problems.append(f"{where}: the {kind} probe is not a native grpc probe")
                        continue
                    if grpc.get("port") != port:
                        problems.append(f"{where}: the {kind} probe asks port {grpc.get('port')}, AUTH_GRPC_ADDR is {port}")
                    if grpc.get("service", "") != want:
                        problems.append(f"{where}: the {kind} probe asks health service {grpc.get('service', '')!r}, not {want!r}")
            else:
                for probe, kind, path in ((ready, "readiness", "/readyz"), (live, "liveness", "/healthz")):
                    get = probe.get("httpGet")
                    if not get:
                        problems.append(f"{where}: the {kind} probe is not an httpGet probe")
                        continue
                    if get.get("path") != path:
                        problems.append(f"{where}: the {kind} probe asks {get.get('path')}, not {path}")
                    if container_port(c, get.get("port")) != port:
                        problems.append(f"{where}: the {kind} probe's port is not API_HTTP_ADDR's {port}")
    return problems


def rule_resources(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        for c in containers(dep):
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    if not (res.get(part) or {}).get(what):
                        problems.append(f"{kind_name(dep)} container {c['name']}: no resources.{part}.{what}")
    return problems


def rule_security(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{kind_name(dep)}: {flag} is on")
        for c in containers(dep) + (pod.get("initContainers") or []):
            where = f"{kind_name(dep)} container {c['name']}"
            sc = c.get("securityContext") or {}

            def eff(key: str) -> Any:
                return sc[key] if key in sc else psc.get(key)

            if eff("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if eff("runAsUser") == 0:
                problems.append(f"{where}: runAsUser is 0")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if caps.get("add"):
                problems.append(f"{where}: capabilities add {caps['add']}")
            if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    return problems


def rule_service_account(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        name = pod.get("serviceAccountName")
        if not name or name == "default":
            problems.append(f"{kind_name(dep)}: runs as the default ServiceAccount")
            continue
        sa = named(docs, "ServiceAccount", name)
        if sa is None:
            problems.append(f"{kind_name(dep)}: ServiceAccount {name} is not in the render")
        elif sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount/{name}: automountServiceAccountToken is not false")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{kind_name(dep)}: automountServiceAccountToken is not false")
    return problems


def rule_termination(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        names = SETTINGS.get(service_of(dep))
        if names is None:
            continue
        grace_period = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        for c in containers(dep):
            env, _ = container_env(docs, c)
            try:
                drain = seconds(setting(env, names["drain"]))
                grace = seconds(setting(env, names["grace"]))
            except ValueError as e:
                problems.append(f"{kind_name(dep)}: {e}")
                continue
            if not grace_period > drain + grace:
                problems.append(
                    f"{kind_name(dep)}: terminationGracePeriodSeconds {grace_period} is not above "
                    f"{names['drain']} {drain:g}s + {names['grace']} {grace:g}s"
                )
    return problems


def rule_prometheus(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        names = SETTINGS.get(service_of(dep))
        if names is None:
            continue
        notes = (dep["spec"]["template"].get("metadata") or {}).get("annotations") or {}
        for c in containers(dep):
            env, _ = container_env(docs, c)
            _, port = port_of(setting(env, names["metrics"]))
            want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
            for k, v in want.items():
                if notes.get(k) != v:
                    problems.append(f"{kind_name(dep)}: pod annotation {k} is {notes.get(k)!r}, not {v!r}")
    return problems


def rule_secrets(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for secret in of_kind(docs, "Secret"):
        for key, value in secret_values(secret).items():
            if value not in PLACEHOLDERS:
                problems.append(f"{kind_name(secret)}: {key} holds a value that is not a placeholder (CHANGE-ME or empty)")
    return problems


def rule_services(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    deps = of_kind(docs, "Deployment")
    for svc in of_kind(docs, "Service"):
        targets = [d for d in deps if selects(svc["spec"].get("selector"), pod_labels(d))]
        if len(targets) != 1:
            problems.append(f"{kind_name(svc)}: selects {len(targets)} Deployments, not 1")
            continue
        c = containers(targets[0])[0]
        for p in svc["spec"].get("ports") or []:
            if container_port(c, p.get("targetPort", p.get("port"))) is None:
                problems.append(f"{kind_name(svc)}: targetPort {p.get('targetPort')} is no port of {kind_name(targets[0])}")
    auth_svc = named(docs, "Service", "auth-service")
    api = named(docs, "Deployment", "api-service")
    if auth_svc is None:
        problems.append("no Service auth-service")
    else:
        # The load-spreading choice of deploy/README.md: a ClusterIP Service, and connections
        # recycled by auth-service's AUTH_MAX_CONNECTION_AGE.
        if auth_svc["spec"].get("clusterIP") == "None":
            problems.append("Service/auth-service is headless; deploy/README.md relies on a ClusterIP Service")
        auth = named(docs, "Deployment", "auth-service")
        if auth is not None:
            auth_env, _ = container_env(docs, containers(auth)[0])
            age = auth_env.get("AUTH_MAX_CONNECTION_AGE", "")
            if age.strip() in ("", "0", "0s"):
                problems.append("auth-service has no AUTH_MAX_CONNECTION_AGE: connections would never move to new replicas")
        if api is not None:
            env, _ = container_env(docs, containers(api)[0])
            url = env.get("API_AUTH_URL", "")
            ports = [p["port"] for p in auth_svc["spec"].get("ports") or []]
            if not any(url == f"http://auth-service:{p}" for p in ports):
                problems.append(f"API_AUTH_URL {url!r} is not http://auth-service:<port of Service/auth-service>")
    return problems


def rule_network(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    policies = of_kind(docs, "NetworkPolicy")
    for dep in of_kind(docs, "Deployment"):
        labels = pod_labels(dep)
        mine = [
            p for p in policies
            if selects((p["spec"].get("podSelector") or {}).get("matchLabels"), labels)
            and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
        ]
        if not mine:
            problems.append(f"{kind_name(dep)}: no NetworkPolicy limits who reaches it")
            continue
        c = containers(dep)[0]
        guarded = {"metrics": container_port(c, "metrics")}
        if service_of(dep) == "auth-service":
            guarded["grpc"] = container_port(c, "grpc")
        for policy in mine:
            for i, rule in enumerate(policy["spec"].get("ingress") or []):
                ports = rule.get("ports")
                opened = (
                    set(guarded)
                    if not ports
                    else {name for name, number in guarded.items() for p in ports if p.get("port") in (name, number)}
                )
                peers = rule.get("from") or []
                where = f"{kind_name(policy)} ingress rule {i + 1}"
                for name in sorted(opened):
                    if not peers:
                        problems.append(f"{where}: opens the {name} port to everyone")
                        continue
                    for peer in peers:
                        if "ipBlock" in peer:
                            problems.append(f"{where}: opens the {name} port to an ipBlock")
                        elif name == "grpc" and not (
                            "namespaceSelector" not in peer
                            and any(selects(allowed, (peer.get("podSelector") or {}).get("matchLabels") or {}) for allowed in AUTH_CLIENT_LABELS)
                        ):
                            problems.append(f"{where}: opens the grpc port to {peer}, not only api-service and labelled clients")
                        elif name == "metrics" and not (peer.get("podSelector") or {}).get("matchLabels"):
                            problems.append(f"{where}: opens the metrics port to every pod of {peer}")
    return problems


# What each service must be able to reach (port, protocol): DNS, PostgreSQL and Redis for
# both, WeChat's API for auth-service; api-service's call to auth-service is checked apart,
# against auth-service's own gRPC containerPort.
EGRESS_NEEDS = {
    "auth-service": [(53, "UDP"), (53, "TCP"), (443, "TCP"), (5432, "TCP"), (6379, "TCP")],
    "api-service": [(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP")],
}


def egress_allows(rules: list[Doc], port: int, protocol: str, to: Callable[[Doc], bool] | None = None) -> bool:
    """Whether one of `rules` lets traffic out on `port`/`protocol` (to a peer `to` accepts,
    when given; a rule with no `to` reaches every peer)."""
    for rule in rules:
        ports = rule.get("ports")
        port_ok = not ports or any(
            p.get("port") in (None, port) and (p.get("protocol") or "TCP") == protocol for p in ports
        )
        peers = rule.get("to") or []
        peer_ok = to is None or not peers or any(to(peer) for peer in peers)
        if port_ok and peer_ok:
            return True
    return False


def rule_egress(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    policies = of_kind(docs, "NetworkPolicy")
    auth = named(docs, "Deployment", "auth-service")
    auth_grpc = container_port(containers(auth)[0], "grpc") if auth is not None else None
    for dep in of_kind(docs, "Deployment"):
        labels, name = pod_labels(dep), service_of(dep)
        mine = [
            p for p in policies
            if selects((p["spec"].get("podSelector") or {}).get("matchLabels"), labels)
            and "Egress" in (p["spec"].get("policyTypes") or [])
        ]
        if not mine:
            problems.append(f"{kind_name(dep)}: no NetworkPolicy limits what it reaches")
            continue
        rules = [r for p in mine for r in p["spec"].get("egress") or []]
        for i, rule in enumerate(rules):
            ports, peers = rule.get("ports"), rule.get("to")
            every_port = not ports or any(p.get("port") is None for p in ports)
            every_peer = not peers or any(
                "ipBlock" in peer and peer["ipBlock"].get("cidr") in ("0.0.0.0/0", "::/0") for peer in peers
            )
            if every_port and every_peer:
                problems.append(f"{kind_name(dep)}: egress rule {i + 1} lets every port out to every address")
        for port, protocol in EGRESS_NEEDS.get(name, []):
            if not egress_allows(rules, port, protocol):
                problems.append(f"{kind_name(dep)}: no egress on {port}/{protocol}")
        if name == "api-service" and auth is not None:
            auth_labels = pod_labels(auth)

            def to_auth(peer: Doc) -> bool:
                return "namespaceSelector" not in peer and selects(
                    (peer.get("podSelector") or {}).get("matchLabels"), auth_labels
                )

            if auth_grpc is None or not egress_allows(rules, auth_grpc, "TCP", to_auth):
                problems.append(
                    f"{kind_name(dep)}: no egress to auth-service's pods on their gRPC containerPort ({auth_grpc})"
                )
    return problems


def rule_availability(docs: list[Doc], overlay: str) -> list[str]:
    if overlay in SINGLE_REPLICA_OVERLAYS:
        return []
    problems = []
    for dep in of_kind(docs, "Deployment"):
        name, labels = dep["metadata"]["name"], pod_labels(dep)
        hpas = [
            h for h in of_kind(docs, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"].get("kind") == "Deployment" and h["spec"]["scaleTargetRef"].get("name") == name
        ]
        if len(hpas) != 1:
            problems.append(f"{kind_name(dep)}: {len(hpas)} HorizontalPodAutoscalers, not 1")
        elif hpas[0]["spec"].get("minReplicas", 1) < 2 or hpas[0]["spec"]["maxReplicas"] < hpas[0]["spec"].get("minReplicas", 1):
            problems.append(f"{kind_name(dep)}: its HPA's minReplicas is below 2 (or above maxReplicas)")
        if dep["spec"].get("replicas") is not None and dep["spec"]["replicas"] < 2:
            problems.append(f"{kind_name(dep)}: replicas {dep['spec']['replicas']} is below 2")
        pdbs = [p for p in of_kind(docs, "PodDisruptionBudget") if selects((p["spec"].get("selector") or {}).get("matchLabels"), labels)]
        if len(pdbs) != 1:
            problems.append(f"{kind_name(dep)}: {len(pdbs)} PodDisruptionBudgets, not 1")
        elif not (pdbs[0]["spec"].get("minAvailable", 0) >= 1 or "maxUnavailable" in pdbs[0]["spec"]):
            problems.append(f"{kind_name(dep)}: its PodDisruptionBudget keeps no pod available")
        spread = dep["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
        keys = {t["topologyKey"] for t in spread if selects((t.get("labelSelector") or {}).get("matchLabels"), labels)}
        if not {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys:
            problems.append(f"{kind_name(dep)}: not spread over nodes and zones (topologySpreadConstraints)")
        rolling = (dep["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        if rolling.get("maxUnavailable") not in (0, "0%"):
            problems.append(f"{kind_name(dep)}: a rollout may stop an old pod before a new one is ready (maxUnavailable)")
    return problems


def rule_images(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    for dep in of_kind(docs, "Deployment"):
        for c in containers(dep):
            image = c.get("image", "")
            if image.endswith(":latest") or ("@sha256:" not in image and ":" not in image.rsplit("/", 1)[-1]):
                problems.append(f"{kind_name(dep)}: image {image!r} has no tag or digest (or :latest)")
            if overlay not in SINGLE_REPLICA_OVERLAYS and "." not in image.split("/", 1)[0]:
                problems.append(f"{kind_name(dep)}: image {image!r} names no registry (kustomize images: sets it)")
    return problems


def rule_namespace(docs: list[Doc], overlay: str) -> list[str]:
    problems = []
    namespaces = of_kind(docs, "Namespace")
    if len(namespaces) != 1:
        return [f"{len(namespaces)} Namespaces in the render, not 1"]
    ns = namespaces[0]["metadata"]
    if (ns.get("labels") or {}).get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append(f"Namespace/{ns['name']} does not enforce the restricted Pod Security Standard")
    for d in docs:
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != ns["name"]:
            problems.append(f"{kind_name(d)} is not in namespace {ns['name']}")
    return problems


RULES: list[tuple[str, str, Callable[[list[Doc], str], list[str]]]] = [
    ("deployments", "exactly the Deployments auth-service and api-service", rule_deployments),
    ("env", "every envFrom ConfigMap/Secret is in the render", rule_env),
    ("listen", "listen and metrics addresses are 0.0.0.0 and match the containerPorts", rule_listen),
    ("probes", "readiness and liveness probes: grpc health (auth), /readyz and /healthz (api)", rule_probes),
    ("resources", "cpu and memory requests and limits on every container", rule_resources),
    ("security", "runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, drop ALL, seccomp RuntimeDefault", rule_security),
    ("serviceaccount", "own ServiceAccount, no API token mounted", rule_service_account),
    ("termination", "terminationGracePeriodSeconds above drain delay + shutdown grace", rule_termination),
    ("prometheus", "prometheus.io/scrape, /port (the metrics port), /path annotations", rule_prometheus),
    ("secrets", "every Secret value is a placeholder (CHANGE-ME or empty)", rule_secrets),
    ("services", "Services select their pods; auth-service ClusterIP with AUTH_MAX_CONNECTION_AGE; API_AUTH_URL names it", rule_services),
    ("network", "NetworkPolicy: gRPC only from api-service and labelled clients, metrics only from Prometheus", rule_network),
    ("egress", "NetworkPolicy egress: DNS, PostgreSQL, Redis, WeChat (auth), auth-service's gRPC port (api); nothing wide open", rule_egress),
    ("availability", "HPA minReplicas >= 2, PDB, topology spread, surge-only rollouts (not for local)", rule_availability),
    ("images", "images have a tag or digest, and a registry outside local", rule_images),
    ("namespace", "one Namespace, restricted Pod Security enforced, everything in it", rule_namespace),
]


# ---------------------------------------------------------------------------------------
# Broken on purpose: each must be caught, or the check proves nothing.


def dep(docs: list[Doc], name: str) -> Doc:
    d = named(docs, "Deployment", name)
    assert d is not None
    return d


def ctr(docs: list[Doc], name: str) -> Doc:
    return containers(dep(docs, name))[0]


def config(docs: list[Doc], service: str) -> dict[str, str]:
    ref = next(s["configMapRef"]["name"] for s in ctr(docs, service)["envFrom"] if "configMapRef" in s)
    cm = named(docs, "ConfigMap", ref)
    assert cm is not None
    return cm["data"]


def first_secret(docs: list[Doc]) -> Doc:
    return of_kind(docs, "Secret")[0]


def egress_of(docs: list[Doc], service: str) -> list[Doc]:
    policy = named(docs, "NetworkPolicy", service)
    assert policy is not None
    return policy["spec"]["egress"]


def grpc_rule(docs: list[Doc]) -> Doc:
    policy = named(docs, "NetworkPolicy", "auth-service")
    assert policy is not None
    return next(r for r in policy["spec"]["ingress"] if any(p.get("port") == "grpc" for p in r.get("ports") or []))


MUTATIONS: list[tuple[str, str, Callable[[list[Doc]], None]]] = [
    ("probes", "auth-service without a readinessProbe", lambda d: ctr(d, "auth-service").pop("readinessProbe")),
    ("probes", "api-service without a livenessProbe", lambda d: ctr(d, "api-service").pop("livenessProbe")),
    ("probes", "auth-service readiness on health service \"\"", lambda d: ctr(d, "auth-service")["readinessProbe"]["grpc"].pop("service")),
    ("probes", "api-service readiness on /healthz", lambda d: ctr(d, "api-service")["readinessProbe"]["httpGet"].update(path="/healthz")),
    ("resources", "api-service without resource limits", lambda d: ctr(d, "api-service")["resources"].pop("limits")),
    ("security", "a writable root filesystem", lambda d: ctr(d, "auth-service")["securityContext"].update(readOnlyRootFilesystem=False)),
    ("security", "privilege escalation not forbidden", lambda d: ctr(d, "api-service")["securityContext"].pop("allowPrivilegeEscalation")),
    ("security", "capabilities not dropped", lambda d: ctr(d, "auth-service")["securityContext"].pop("capabilities")),
    ("security", "runAsNonRoot false in the container", lambda d: ctr(d, "api-service")["securityContext"].update(runAsNonRoot=False)),
    ("security", "no seccomp profile", lambda d: (ctr(d, "auth-service")["securityContext"].pop("seccompProfile"), dep(d, "auth-service")["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile"))),
    ("serviceaccount", "the API token mounted", lambda d: dep(d, "auth-service")["spec"]["template"]["spec"].update(automountServiceAccountToken=True)),
    ("termination", "terminationGracePeriodSeconds equal to drain + grace", lambda d: dep(d, "auth-service")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=25)),
    ("termination", "API_SHUTDOWN_GRACE raised to 60s", lambda d: config(d, "api-service").update(API_SHUTDOWN_GRACE="60s")),
    ("secrets", "a real value in a Secret", lambda d: first_secret(d).setdefault("data", {}).update(WECHAT_SECRET=base64.b64encode(b"0123456789abcdef0123456789abcdef").decode())),
    ("secrets", "a real value in stringData", lambda d: first_secret(d).update(stringData={"AUTH_TOKEN_KEY": "a-real-token-key-of-32-bytes-or-more!"})),
    ("listen", "a loopback listen address", lambda d: config(d, "api-service").update(API_HTTP_ADDR="127.0.0.1:8080")),
    ("prometheus", "the scrape port annotation on the public port", lambda d: dep(d, "api-service")["spec"]["template"]["metadata"]["annotations"].update({"prometheus.io/port": "8080"})),
    ("network", "the gRPC port open to every pod", lambda d: grpc_rule(d).update({"from": []})),
    ("network", "the gRPC port open to a whole namespace", lambda d: grpc_rule(d).update({"from": [{"namespaceSelector": {}}]})),
    ("egress", "api-service's egress to auth-service on another port", lambda d: next(r for r in egress_of(d, "api-service") if r.get("to") and "podSelector" in r["to"][0] and "namespaceSelector" not in r["to"][0])["ports"][0].update(port=50052)),
    ("egress", "auth-service's gRPC containerPort moved, api-service's egress not", lambda d: next(p for p in ctr(d, "auth-service")["ports"] if p.get("name") == "grpc").update(containerPort=50052)),
    ("egress", "auth-service without DNS", lambda d: egress_of(d, "auth-service").pop(0)),
    ("egress", "an egress rule that lets everything out", lambda d: egress_of(d, "api-service").append({})),
    ("egress", "an egress rule to 0.0.0.0/0 on every port", lambda d: egress_of(d, "auth-service").append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
    ("egress", "an egress rule on every TCP port", lambda d: egress_of(d, "api-service").append({"ports": [{"protocol": "TCP"}]})),
    ("services", "a headless auth-service", lambda d: named(d, "Service", "auth-service")["spec"].update(clusterIP="None")),  # type: ignore[index]
    ("services", "no AUTH_MAX_CONNECTION_AGE", lambda d: config(d, "auth-service").pop("AUTH_MAX_CONNECTION_AGE")),
    ("availability", "HPA minReplicas 1", lambda d: named(d, "HorizontalPodAutoscaler", "auth-service")["spec"].update(minReplicas=1)),  # type: ignore[index]
    ("availability", "no PodDisruptionBudget", lambda d: d.remove(named(d, "PodDisruptionBudget", "api-service"))),
    ("images", "an image without registry", lambda d: ctr(d, "auth-service").update(image="wxauth/auth-service:dev")),
]

SCHEMA_MUTATIONS: list[tuple[str, Callable[[list[Doc]], None]]] = [
    ("a misspelt field (strict)", lambda d: ctr(d, "auth-service").update(readinessProbes={})),
    ("a wrong type", lambda d: dep(d, "api-service")["spec"].update(replicas="two")),
    ("an API version that does not exist", lambda d: named(d, "HorizontalPodAutoscaler", "api-service").update(apiVersion="autoscaling/v2beta3")),  # type: ignore[union-attr]
    ("a probe without a handler port", lambda d: ctr(d, "auth-service")["livenessProbe"]["grpc"].pop("port")),
]


# ---------------------------------------------------------------------------------------
# Repository hygiene and the Dockerfile


def git_problems(repo: Path) -> list[str]:
    if shutil.which("git") is None or not (repo / ".git").exists():
        return []
    problems = []
    tracked = subprocess.run(
        ["git", "ls-files", "--", "deploy/**/*.secrets.env"], cwd=repo, capture_output=True, text=True, check=False
    ).stdout.split()
    problems += [f"{t} is committed: secrets never are" for t in tracked]
    for example in sorted((repo / "deploy/k8s/overlays").glob("*/*.secrets.env.example")):
        real = example.with_suffix("").relative_to(repo)
        if subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=repo, check=False).returncode != 0:
            problems.append(f"{real} is not git-ignored")
    return problems


def dockerfile_problems(repo: Path) -> list[str]:
    import dockerfile  # the official BuildKit parser

    problems = []
    path = repo / "deploy/Dockerfile"
    commands = dockerfile.parse_file(str(path))
    stages: dict[str, list[Any]] = {}
    current: list[Any] = []
    for cmd in commands:
        if cmd.cmd == "FROM":
            current = []
            name = cmd.value[2] if len(cmd.value) == 3 and cmd.value[1].upper() == "AS" else f"#{len(stages)}"
            stages[name] = current
        current.append(cmd)
    build = "\n".join(c.original for stage in stages.values() for c in stage if c.cmd == "RUN")
    if "cargo build --release --locked" not in build:
        problems.append("no `cargo build --release --locked`: the images must build from Cargo.lock")
    for service in ("auth-service", "api-service"):
        stage = stages.get(service)
        if stage is None:
            problems.append(f"no build target {service}")
            continue
        if f"-p {service}" not in build:
            problems.append(f"the build does not build -p {service}")
        users = [c.value[0] for c in stage if c.cmd == "USER"]
        if not users or users[-1].split(":")[0] in ("", "0", "root") or not users[-1].split(":")[0].isdigit():
            problems.append(f"{service}: the last USER is not a numeric non-root uid (runAsNonRoot needs one)")
        entry = [c for c in stage if c.cmd == "ENTRYPOINT"]
        if not entry or not entry[-1].json or entry[-1].value[0] != f"/usr/local/bin/{service}":
            problems.append(f"{service}: ENTRYPOINT is not [\"/usr/local/bin/{service}\"] (exec form: no shell)")
        if any(c.cmd == "RUN" for c in stage):
            problems.append(f"{service}: the runtime stage RUNs something (it has no shell)")
        if not any(c.cmd == "COPY" and f"/out/{service}" in c.original for c in stage):
            problems.append(f"{service}: does not copy its binary from the build stage")
    ignore = repo / "deploy/Dockerfile.dockerignore"
    if not ignore.exists():
        problems.append("no deploy/Dockerfile.dockerignore: target/ and data/ would enter the build context")
    else:
        lines = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
        members = tomllib.loads((repo / "Cargo.toml").read_text())["workspace"]["members"]
        # .cargo/config.toml sets build flags (the bundled SQLite's): an image built without
        # it would differ from what the tests ran.
        config = [".cargo"] if (repo / ".cargo/config.toml").exists() else []
        for needed in ["Cargo.toml", "Cargo.lock", *config, *members]:
            if f"!{needed}" not in lines:
                problems.append(f"Dockerfile.dockerignore does not let {needed} into the build context")
        for excluded in ("**/target", "**/*.secrets.env"):
            if excluded not in lines:
                problems.append(f"Dockerfile.dockerignore does not keep {excluded} out")
    return problems


# ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubectl", required=True, help="kubectl with kustomize v5 (kubectl kustomize)")
    parser.add_argument("--versions", default="1.28.0,1.37.0", help="Kubernetes versions to validate against")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    versions = args.versions.split(",")
    report = Report()

    kubectl_version = subprocess.run([args.kubectl, "version", "--client"], capture_output=True, text=True, check=False).stdout
    print("deploy-check: tools")
    print(f"  renderer   {args.kubectl}: {' / '.join(kubectl_version.strip().splitlines())}")
    print(f"  validator  kubernetes-validate {kubernetes_validate.__version__} (strict, offline schemas), against Kubernetes {', '.join(versions)}")

    with tempfile.TemporaryDirectory(prefix="wxauth-deploy-check-") as tmp:
        k8s = Path(tmp) / "k8s"
        print("deploy-check: rendering (committed files only; each *.secrets.env from its .example)")
        report.check("secret files: every secretGenerator reads an env file with a committed .example", materialize(repo / "deploy/k8s", k8s))
        rendered: dict[str, list[Doc]] = {}
        targets = [k8s / "base"] + sorted(p for p in (k8s / "overlays").iterdir() if p.is_dir())
        for target in targets:
            label = "base" if target.name == "base" else f"overlay {target.name}"
            try:
                docs = render(args.kubectl, target)
            except RuntimeError as e:
                report.fail(f"render {label}", [str(e)])
                continue
            rendered[target.name] = docs
            report.ok(f"render {label}: {len(docs)} objects ({', '.join(sorted({d['kind'] for d in docs}))})")

        print("deploy-check: schemas")
        for name, docs in rendered.items():
            label = "base" if name == "base" else f"overlay {name}"
            report.check(f"{label}: {len(docs)} objects valid against Kubernetes {', '.join(versions)} (strict)", schema_problems(docs, versions))

        overlays = {k: v for k, v in rendered.items() if k != "base"}
        for name, docs in overlays.items():
            print(f"deploy-check: rules, overlay {name}")
            for _, what, rule in RULES:
                report.check(what, rule(docs, name))

        production = overlays.get("production")
        print("deploy-check: broken on purpose (a copy of overlay production; each must be caught)")
        if production is None:
            report.fail("overlay production", ["not rendered, nothing to break"])
        else:
            rules = {key: rule for key, _, rule in RULES}
            for key, what, mutate in MUTATIONS:
                docs = copy.deepcopy(production)
                mutate(docs)
                caught = rules[key](docs, "production")
                report.check(f"{what}: caught by rule {key}", [] if caught else [f"rule {key} did not notice"])
            for what, mutate in SCHEMA_MUTATIONS:
                docs = copy.deepcopy(production)
                mutate(docs)
                caught = schema_problems(docs, versions[-1:])
                report.check(f"{what}: caught by schema validation", [] if caught else ["the validator did not notice"])

    print("deploy-check: repository")
    if shutil.which("git") and (repo / ".git").exists():
        report.check("no *.secrets.env committed, each git-ignored", git_problems(repo))
    else:
        print("  skip  no *.secrets.env committed, each git-ignored (no git, or not a git checkout)")
    report.check("deploy/Dockerfile (BuildKit parser): --locked build, targets auth-service and api-service, non-root, exec ENTRYPOINT; build context ignore file", dockerfile_problems(repo))

    print(f"deploy-check: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
