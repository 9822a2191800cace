"""deploy/kubernetes/ is valid and points at what the server really serves (issue 16.4).

No network at test time and no Kubernetes package in the environment, so the check is self-contained:
a structural schema of the subset of the Kubernetes (apps/v1 Deployment, v1 Service) and KServe
(serving.kserve.io/v1alpha1 ServingRuntime, v1beta1 InferenceService) types the manifests use,
written from their API references (unknown fields are refused: a misspelt `readynessProbe` fails),
the cross-references between objects (selectors, named ports, volumes, runtime names, model format),
the container arguments parsed by tinyserve's own CLI parser, and a real `tinyserve serve` started
with the Deployment's arguments (ports moved to free ones, a local repository, the CPU) whose probe
paths are fetched on the probe ports.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import fleet

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}

# --- the schema: {field: type or nested schema}; "!" marks a required field ----------------------
STR, INT, BOOL = str, int, bool
PORT = (int, str)  # an IntOrString
QTY = "quantity"
META = {"!name": STR, "labels": {"*": STR}, "annotations": {"*": STR}, "namespace": STR}
RESOURCES = {"requests": {"*": QTY}, "limits": {"*": QTY}}
PROBE = {"httpGet": {"!path": STR, "!port": PORT, "scheme": STR}, "tcpSocket": {"!port": PORT},
         "periodSeconds": INT, "timeoutSeconds": INT, "failureThreshold": INT, "successThreshold": INT,
         "initialDelaySeconds": INT}
CONTAINER = {
    "!name": STR, "image": STR, "command": [STR], "args": [STR],
    "env": [{"!name": STR, "value": STR,
             "valueFrom": {"secretKeyRef": {"!name": STR, "!key": STR}, "configMapKeyRef": {"!name": STR, "!key": STR}}}],
    "ports": [{"!containerPort": INT, "name": STR, "protocol": STR}],
    "livenessProbe": PROBE, "readinessProbe": PROBE, "startupProbe": PROBE, "resources": RESOURCES,
    "volumeMounts": [{"!name": STR, "!mountPath": STR, "readOnly": BOOL}],
}
POD_SPEC = {"!containers": [CONTAINER], "terminationGracePeriodSeconds": INT,
            "volumes": [{"!name": STR, "emptyDir": {"sizeLimit": QTY, "medium": STR},
                         "persistentVolumeClaim": {"!claimName": STR}, "hostPath": {"!path": STR}}]}
SCHEMAS = {
    ("apps/v1", "Deployment"): {
        "!apiVersion": STR, "!kind": STR, "!metadata": META,
        "!spec": {"replicas": INT, "!selector": {"!matchLabels": {"*": STR}},
                  "strategy": {"type": STR, "rollingUpdate": {"maxUnavailable": PORT, "maxSurge": PORT}},
                  "!template": {"!metadata": META | {"!name": None, "name": STR}, "!spec": POD_SPEC}}},
    ("v1", "Service"): {
        "!apiVersion": STR, "!kind": STR, "!metadata": META,
        "!spec": {"!selector": {"*": STR}, "type": STR,
                  "!ports": [{"!port": INT, "name": STR, "targetPort": PORT, "protocol": STR}]}},
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): {
        "!apiVersion": STR, "!kind": STR, "!metadata": META,
        "!spec": {"!supportedModelFormats": [{"!name": STR, "version": STR, "autoSelect": BOOL, "priority": INT}],
                  "protocolVersions": [STR], "multiModel": BOOL, "!containers": [CONTAINER]}},
    ("serving.kserve.io/v1beta1", "InferenceService"): {
        "!apiVersion": STR, "!kind": STR, "!metadata": META,
        "!spec": {"!predictor": {"minReplicas": INT, "maxReplicas": INT,
                                 "model": {"!modelFormat": {"!name": STR, "version": STR}, "runtime": STR,
                                           "protocolVersion": STR, "storageUri": STR, "resources": RESOURCES}}}},
}


def check(value, schema, where: str) -> list[str]:
    """Every way `value` breaks `schema` (empty when it fits)."""
    if schema == QTY:
        return [] if isinstance(value, str) and QUANTITY.match(value) else [f"{where}: {value!r} is not a quantity"]
    if isinstance(schema, type) or isinstance(schema, tuple):
        ok = isinstance(value, schema) and not (schema is INT and isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is not {schema}"]
    if isinstance(schema, list):
        if not isinstance(value, list) or not value:
            return [f"{where}: expected a non-empty list"]
        return [e for i, v in enumerate(value) for e in check(v, schema[0], f"{where}[{i}]")]
    if not isinstance(value, dict):
        return [f"{where}: expected a mapping"]
    errs = []
    fields = {k.lstrip("!"): s for k, s in schema.items() if s is not None}
    for k in schema:
        if k.startswith("!") and schema[k] is not None and k[1:] not in value:
            errs.append(f"{where}: {k[1:]} is required")
    for k, v in value.items():
        sub = fields.get(k, fields.get("*"))
        if sub is None:
            errs.append(f"{where}: unknown field {k!r}")
        else:
            errs += check(v, sub, f"{where}.{k}")
    return errs


def qty(text: str) -> float:
    m = QUANTITY.match(text)
    return float(text[: m.start(2)] if m.group(2) else text) * _UNITS[m.group(2) or ""]


@pytest.fixture(scope="module")
def docs():
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


def test_every_manifest_fits_its_schema(docs):
    assert set(docs) == {"Deployment", "Service", "ServingRuntime", "InferenceService"}
    for kind, doc in docs.items():
        schema = SCHEMAS.get((doc["apiVersion"], kind))
        assert schema is not None, f"{kind}: unknown apiVersion {doc['apiVersion']}"
        assert check(doc, schema, kind) == []
        assert DNS_LABEL.match(doc["metadata"]["name"])


def test_the_checker_refuses_what_kubernetes_refuses(docs):
    import copy

    d = copy.deepcopy(docs["Deployment"])
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["readynessProbe"] = c.pop("readinessProbe")
    c["resources"]["requests"]["cpu"] = "four"
    del c["livenessProbe"]["httpGet"]["path"]
    errs = check(d, SCHEMAS[("apps/v1", "Deployment")], "Deployment")
    assert any("unknown field 'readynessProbe'" in e for e in errs)
    assert any("'four' is not a quantity" in e for e in errs)
    assert any("livenessProbe.httpGet: path is required" in e for e in errs)


def _ports(container) -> dict:
    return {p.get("name"): p["containerPort"] for p in container.get("ports", ())}


def _probe_port(container, probe) -> int:
    port = container[probe]["httpGet"]["port"]
    return _ports(container)[port] if isinstance(port, str) else port


def _flags(args: list[str]) -> dict:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_objects_refer_to_each_other(docs):
    dep, svc = docs["Deployment"], docs["Service"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    for p in svc["spec"]["ports"]:  # every targetPort names a container port
        assert p["targetPort"] in _ports(c) or p["targetPort"] in _ports(c).values(), p
    assert {m["name"] for m in c["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}
    flags = _flags(c["args"])
    assert flags["cache-dir"] in {m["mountPath"] for m in c["volumeMounts"]}  # the cache is on a volume
    for res in (c["resources"], docs["ServingRuntime"]["spec"]["containers"][0]["resources"]):
        assert qty(res["requests"]["nvidia.com/gpu"]) == qty(res["limits"]["nvidia.com/gpu"]) == 1
        assert qty(res["requests"]["memory"]) <= qty(res["limits"]["memory"])
    assert pod["terminationGracePeriodSeconds"] > float(flags["drain-timeout"])
    rt, isvc = docs["ServingRuntime"], docs["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in rt["spec"]["protocolVersions"] == ["v2"]


def test_container_arguments_parse_with_the_servers_own_parser(docs):
    from tinyserve.cli import build_parser

    parser = build_parser()
    dep = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = parser.parse_args(dep["args"])
    assert args.fn.__name__ == "cmd_serve" and args.model_control == "poll"
    assert _ports(dep)["tinyserve"] == args.port and _ports(dep)["metrics"] == args.metrics_port
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert _probe_port(dep, probe) == args.metrics_port
    rt = docs["ServingRuntime"]["spec"]["containers"][0]
    flags = _flags(rt["args"])
    assert int(flags["http-port"]) == rt["ports"][0]["containerPort"] == 8000
    for probe in ("livenessProbe", "readinessProbe"):
        assert _probe_port(rt, probe) == int(flags["metrics-port"])
    args = parser.parse_args(rt["args"])  # every flag of the KServe runtime is serve's (--http-port too)
    assert args.http_port == 8000


def test_probe_paths_answer_on_the_probe_ports_of_a_real_server(docs, tmp_path):
    """`tinyserve serve` with the Deployment's arguments (free ports instead of 8470 / 9470, a local
    repository, the CPU): each probe's path answers 200 on its port, an unknown path 404."""
    from tinyserve.pack import pack
    from tinyserve.repository import Repository

    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    repo = Repository(tmp_path / "repo", create=True)
    pack(repo, "mlp", "tinyserve.examples:mlp")
    drop = ("host", "port", "metrics-host", "metrics-port", "repo", "endpoint-url", "region", "cache-dir",
            "cache-size", "device")
    args = [a for a in c["args"][1:] if a.split("=", 1)[0][2:] not in drop]
    srv = fleet.ServeProcess([*args, "--repo", str(repo.root), "--model", "mlp"], log_dir=tmp_path)
    try:
        srv.start()
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            path = c[probe]["httpGet"]["path"]
            assert fleet.http_status(f"http://{srv.host}:{srv.metrics_port}{path}") == 200, (probe, path)
        assert fleet.http_status(f"http://{srv.host}:{srv.metrics_port}/no-such-probe") == 404
    finally:
        srv.stop()
