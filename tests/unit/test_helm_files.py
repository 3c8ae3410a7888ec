"""The Helm chart's static files, without helm: the CRD copy is fresh, every value is documented and in the
schema, the chart's versions agree with the package. (Rendering and installing: tests/cluster/test_helm.py.)"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import yaml

from tests.kube import REPO

CHART = REPO / "helm" / "tauon"


def test_chart_crds_are_byte_identical_to_the_generated_ones():
    """Helm reads files only from inside the chart, so helm/tauon/files/crds/ holds a copy of crds/.
    After `make crds` (or `tauon crds`), refresh it: cp crds/*.yaml helm/tauon/files/crds/"""
    src = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    copy = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert src, "crds/ is empty"
    assert sorted(copy) == sorted(src), "helm/tauon/files/crds/ and crds/ hold different files"
    stale = [name for name in src if copy[name] != src[name]]
    assert not stale, f"stale chart CRDs (cp crds/*.yaml helm/tauon/files/crds/): {stale}"


def test_chart_versions():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == project["version"], "appVersion must be the operator's version"
    assert chart["kubeVersion"] == ">=1.28.0-0"


def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted paths of every value; maps and lists that default to empty are leaves too."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and not path.endswith(("Probe", "SecurityContext", "securityContext", "resources", "labels"))
        ):
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    readme = readme[readme.index("## Values") :]
    readme = readme[: readme.index("\n## ", 1)]
    documented = set(re.findall(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|", readme, re.M))
    missing = set(leaves(values())) - documented
    assert not missing, f"helm/tauon/README.md does not document: {sorted(missing)}"
    unknown = documented - set(leaves(values()))
    assert not unknown, f"helm/tauon/README.md documents values that do not exist: {sorted(unknown)}"


def schema_at(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in path.split("."):
        if node is None or "properties" not in node:
            return None
        node = node["properties"].get(part)
    return node


def test_schema_covers_every_value_and_forbids_unknown_ones():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for path in leaves(values()):
        assert schema_at(schema, path) is not None, f"values.schema.json has no entry for {path}"

    # every object level with fixed keys rejects typos
    def walk(node: dict[str, Any], where: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, child in node["properties"].items():
                walk(child, f"{where}.{key}")

    walk(schema, "values")


def test_schema_accepts_the_defaults():
    """A small structural check of values.yaml against the schema's types and enums (helm itself validates
    fully in the cluster tests)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    types = {
        "string": str,
        "boolean": bool,
        "integer": int,
        "number": (int, float),
        "object": dict,
        "array": list,
    }

    def check(value: Any, node: dict[str, Any], where: str) -> None:
        expected = node.get("type")
        if expected:
            assert isinstance(value, types[expected]), f"{where}: {value!r} is not {expected}"
            assert not (expected in ("integer", "number") and isinstance(value, bool)), where
        if "enum" in node:
            assert value in node["enum"], f"{where}: {value!r} not in {node['enum']}"
        if "pattern" in node and isinstance(value, str):
            assert re.search(node["pattern"], value), f"{where}: {value!r} !~ {node['pattern']}"
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{where}.{key}: not in the schema"
                check(child, node["properties"][key], f"{where}.{key}")

    check(values(), schema, "values")


def test_dashboard_is_valid_grafana_json():
    board = json.loads((CHART / "files" / "dashboards" / "tauon-overview.json").read_text())
    assert board["uid"] == "tauon-overview"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


# metric of the vLLM runtime -> its counterpart of the tauon runtime, drawn in the same panel
SIDE_BY_SIDE = {
    "vllm:num_requests_running": "tauon_server_running_sequences",
    "vllm:num_requests_waiting": "tauon_server_waiting_sequences",
    "vllm:time_to_first_token_seconds_bucket": "tauon_server_time_to_first_token_seconds_bucket",
    "vllm:generation_tokens_total": "tauon_server_generated_tokens_total",
    "vllm:prompt_tokens_total": "tauon_server_generated_tokens_total",
    "vllm:e2e_request_latency_seconds_bucket": "tauon_server_request_duration_seconds_bucket",
}


def test_dashboard_draws_the_vllm_runtime_beside_the_tauon_one():
    board = json.loads((CHART / "files" / "dashboards" / "tauon-overview.json").read_text())
    exprs = {
        p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in board["panels"] if p["type"] != "row"
    }
    for vllm_metric, tauon_metric in SIDE_BY_SIDE.items():
        panels = [title for title, expr in exprs.items() if re.search(rf"{vllm_metric}\{{", expr)]
        assert panels, f"no panel draws {vllm_metric}"
        assert any(tauon_metric in exprs[title] for title in panels), (vllm_metric, panels)
    for title, expr in exprs.items():
        if "vllm:" in expr:  # the PodMonitor's target labels, as for the tauon metrics
            assert 'namespace=~"$namespace"' in expr and "inferenceservice" in expr, title
    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert any("vLLM" in r["title"] for r in rows)


def test_server_podmonitor_scrapes_vllm_pods_too():
    """The server PodMonitor selects the labels every model server pod gets (both runtimes) and scrapes
    the port named http at /metrics, where `vllm serve` publishes vllm:* as well."""
    from tauon.api.inferenceservice import InferenceService
    from tauon.render.config import OperatorConfig
    from tauon.render.inferenceservice import ModelLocation, render_deployment
    from tests.manifests import inferenceservice

    text = (CHART / "templates" / "podmonitor.yaml").read_text()
    server = text[text.index("{{- if $pm.server }}") :]
    assert "app.kubernetes.io/name: tauon-model-server" in server
    assert "key: tauon.dev/inference-service" in server
    assert re.search(r"- port: http\n\s+path: /metrics\n", server)
    body = inferenceservice(
        "llm",
        base={"model": {"source": "hf://org/llm", "task": "causal-lm"}},
        resources={"limits": {"nvidia.com/gpu": "1"}},
    )
    dep = render_deployment(
        InferenceService.model_validate(body), "predictor", ModelLocation("hf://org/llm"), 1, OperatorConfig()
    )
    pod = dep["spec"]["template"]
    assert dep["metadata"]["annotations"]["tauon.dev/runtime"] == "vllm"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "tauon-model-server"
    assert "tauon.dev/inference-service" in pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    port = str(OperatorConfig().server_port)
    assert [p["name"] for p in c["ports"]] == ["http"] and c["args"][c["args"].index("--port") + 1] == port
