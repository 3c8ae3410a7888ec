"""The generated CRDs: fresh, structural, documented."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml

from tauon.api.crds import all_crds
from tests.kube import REPO


def test_crds_check_passes_and_detects_staleness(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "tauon.cli", "crds", "--check"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    stale_dir = tmp_path / "crds"
    subprocess.run([sys.executable, "-m", "tauon.cli", "crds", "--output", str(stale_dir)], check=True)
    f = next(stale_dir.glob("finetunejobs*.yaml"))
    f.write_text(f.read_text().replace("Peak learning rate", "Learning rate"))
    bad = subprocess.run(
        [sys.executable, "-m", "tauon.cli", "crds", "--check", "--output", str(stale_dir)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "stale" in bad.stderr


def walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.get("properties", {}).items():
            yield from walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_structural_and_documented(name: str):
    crd = all_crds()[name]
    on_disk = yaml.safe_load((REPO / "crds" / name).read_text())
    assert on_disk == crd
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema["properties"]["spec"], ".spec"):
        for banned in ("anyOf", "oneOf", "allOf", "$ref", "default", "title", "const"):
            assert banned not in node, f"{path} has {banned}"
        if path != ".spec" and not path.endswith("{}") and not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description (kubectl explain)"
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        if node.get("x-kubernetes-validations"):  # the API server cannot compile CEL on an untyped node
            assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: CEL on an untyped node"


def test_immutability_rules_cover_every_spec_field_but_run_policy():
    spec = all_crds()["finetunejobs.tauon.dev.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]
    rules = " ".join(r["rule"] for r in spec["x-kubernetes-validations"])
    for field in spec["properties"]:
        if field == "runPolicy":
            assert f"self.{field}" not in rules
        else:
            assert f"has(oldSelf.{field})" in rules, field


def test_scale_subresource_and_printer_columns():
    tis = all_crds()["inferenceservices.tauon.dev.yaml"]["spec"]["versions"][0]
    assert tis["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    ftj = all_crds()["finetunejobs.tauon.dev.yaml"]["spec"]
    assert ftj["names"]["shortNames"] == ["ftj"] and ftj["names"]["categories"] == ["tauon", "ml"]


def schema_of(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = all_crds()[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


STORAGE_FIELDS = {
    "finetunejobs.tauon.dev.yaml": {
        ".spec.model.source",
        ".spec.model.tokenizer",
        ".spec.dataset.source",
        ".spec.dataset.cache.storage",
        ".spec.output.storage",
    },
    "inferenceservices.tauon.dev.yaml": {".spec.model.source", ".spec.canary.model.source"},
}


@pytest.mark.parametrize("name", sorted(STORAGE_FIELDS))
def test_every_storage_uri_refuses_dot_and_empty_segments(name: str):
    found = {
        path
        for path, node in walk(schema_of(name))
        if "pvc://" in node.get("pattern", "")
        and any(
            "path segments are not allowed" in r.get("messageExpression", "")
            for r in node.get("x-kubernetes-validations", [])
        )
    }
    unguarded = {p for p, n in walk(schema_of(name)) if "pvc://" in n.get("pattern", "")} - found
    assert found == STORAGE_FIELDS[name] and not unguarded


SEGMENTS = [
    ("pvc://claim", True),
    ("pvc://claim/a/b.jsonl", True),
    ("pvc://claim/a..b/.cache/...", True),
    ("file:///abs/path", True),
    ("file://./rel/path", True),
    ("hf://org/name", True),
    ("pvc://claim/../../tmp/x", False),
    ("pvc://claim/a/..", False),
    ("pvc://claim/./a", False),
    ("pvc://claim//a", False),
    ("pvc://claim/a/", False),
    ("file:///abs/../etc", False),
    ("file:////abs", False),
    ("file://./../up", False),
    ("s3://corpora/web/", True),  # an s3:// prefix may end in one /
    ("s3://corpora/web/part-0.jsonl.gz", True),
    ("s3://corpora", True),
    ("s3://corpora/a//b", False),
    ("s3://corpora/a/../b", False),
    ("s3://corpora/./a", False),
    ("s3://corpora/a//", False),
]


@pytest.mark.parametrize(("uri", "ok"), SEGMENTS)
def test_admission_and_render_share_one_segment_rule(uri: str, ok: bool):
    """The CEL rule in the CRD is the regex render checks (RE2 and Python agree on this syntax)."""
    import re

    from tauon.api.common import BAD_SEGMENT_RE
    from tauon.render.common import InvalidSpec, check_segments

    rule = schema_of("finetunejobs.tauon.dev.yaml")["properties"]["spec"]["properties"]["output"][
        "properties"
    ]["storage"]["x-kubernetes-validations"][0]["rule"]
    cel_regex = rule.removeprefix("!self.matches('").removesuffix("')").replace("\\\\", "\\")
    assert cel_regex == BAD_SEGMENT_RE
    assert (re.search(cel_regex, uri) is None) == ok
    if ok:
        check_segments(uri, "x")
    else:
        with pytest.raises(InvalidSpec, match="x: empty"):
            check_segments(uri, "x")


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_free_form_subtrees_are_not_pruned(name: str):
    """`additionalProperties: true` beside preserve-unknown-fields would prune nested fields."""
    for path, node in walk(schema_of(name)):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert "additionalProperties" not in node, path


def test_pod_template_keys_under_tauon_dev_are_refused():
    for name in all_crds():
        spec = schema_of(name)["properties"]["spec"]
        if name.startswith("finetunesweeps."):  # a sweep's podTemplate is its FineTuneJob template's
            spec = spec["properties"]["template"]["properties"]["spec"]
        tpl = spec["properties"]["podTemplate"]["properties"]
        for key in ("labels", "annotations"):
            (rule,) = tpl[key]["x-kubernetes-validations"]
            assert rule["rule"] == "self.all(k, !k.startsWith('tauon.dev/'))"


def test_inferenceservice_admission_knows_what_vllm_would_refuse():
    """vLLM cannot read s3:// models (main or canary): refused at admission with runtime vllm; the
    generation limits have no default (each runtime then takes the model's own length)."""
    spec = schema_of("inferenceservices.tauon.dev.yaml")["properties"]["spec"]
    rules = {r["message"]: r["rule"] for r in spec["x-kubernetes-validations"]}
    (s3,) = (rule for msg, rule in rules.items() if msg.startswith("spec.runtime vllm cannot serve s3://"))
    assert "self.model.source.startsWith('s3://')" in s3
    assert "self.canary.model.source.startsWith('s3://')" in s3
    gen = spec["properties"]["generation"]
    assert "Defaults to" not in gen["properties"]["maxModelLength"]["description"]
    assert "Defaults to" not in gen["properties"]["maxNewTokens"]["description"]
    (length_rule,) = gen["x-kubernetes-validations"]
    assert length_rule["rule"] == (
        "!has(self.maxNewTokens) || !has(self.maxModelLength) || self.maxNewTokens < self.maxModelLength"
    )
