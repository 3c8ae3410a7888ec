"""The operator's vLLM argv against vLLM 0.11.0 itself: `make contract` (not part of `make test`).

The operator's renderer (this venv) renders the vLLM predictor of a matrix of InferenceServices; the argv
goes through vLLM's own parser, config checks and request handling in the vLLM venv (`make vllm-env`,
hack/vllm/contract.py, CPU only, nothing downloaded: two tiny Llama configs with the repo's tokenizer, one
with 256 positions and one with 128k, on a local "PVC" and in a local Hugging Face cache). Skipped
unless TAUON_VLLM_CONTRACT=1 (set by `make contract`) and the vLLM venv exists.

The results (every case's argv, vLLM's resolved engine settings, the max_tokens vLLM computes for a few
requests) go to $TAUON_CONTRACT_RESULTS (`make contract`: bench/results/vllm_contract.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tauon.api.inferenceservice import InferenceService
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.inferenceservice import ModelLocation, render_deployment, resolve_runtime
from tests.kube import REPO
from tests.manifests import TINY_TOKENIZER, inferenceservice

VLLM_VERSION = "0.11.0"
CACHE = Path(os.environ.get("TAUON_VLLM_CACHE") or Path.home() / ".cache" / "tauon-vllm")
VLLM_PYTHON = CACHE / "venv" / "bin" / "python"
SCRIPT = REPO / "hack" / "vllm" / "contract.py"
CFG = OperatorConfig()
PVC_ROOT = "/mnt/tauon/pvc"
HF_ORG = "tauon-contract"
REVISION = "0" * 40

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TAUON_VLLM_CONTRACT") != "1",
        reason="the vLLM contract runs with `make contract` (TAUON_VLLM_CONTRACT=1), not in `make test`",
    ),
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"no vLLM venv at {VLLM_PYTHON.parent.parent} (build it with `make vllm-env`, ~9 GB)",
    ),
]

# two tiny Llamas: 8 heads (tensor parallel 1, 2 and 8 divide them), 256 and 128k positions
MODELS = {"tiny-256": 256, "tiny-128k": 131072}
GPUS = (1, 2, 8)
# generation sections: none (the model's length, no cap) and both limits set
GENERATIONS: dict[str, dict[str, int]] = {
    "default": {},
    "limits": {"maxModelLength": 200, "maxNewTokens": 64},
}
PROMPT = "hello world, the cat sat on the mat"
REQUESTS = [{"prompt": PROMPT, "max_tokens": None}, {"prompt": PROMPT, "max_tokens": 100}]
REQUESTS += [{"prompt": PROMPT, "max_tokens": 10}]


def write_model(root: Path, positions: int) -> Path:
    """config.json + tokenizer files of a tiny Llama (no weights: vLLM's checks read the config)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": positions,
        "vocab_size": len(tok["model"]["vocab"]),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config))
    shutil.copy(TINY_TOKENIZER / "tokenizer.json", root / "tokenizer.json")
    shutil.copy(TINY_TOKENIZER / "chat_template.jinja", root / "chat_template.jinja")
    # the tokenizer class transformers 4.x (vLLM 0.11's) knows for a tokenizer.json
    tok_config = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.pop("backend", None)
    (root / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return root


def write_hf_cache(hub: Path, repo: str, model: Path) -> None:
    """A Hugging Face hub cache holding `repo` (what vLLM finds offline under HF_HOME)."""
    base = hub / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / REVISION
    shutil.copytree(model, snapshot)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(REVISION)


def isvc(source: str, gpus: int, generation: dict[str, int], **spec: Any) -> InferenceService:
    res = {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}
    body = inferenceservice(
        "llm",
        namespace="ml",
        metadata={"uid": "u", "generation": 1},
        base={"model": {"source": source, "task": "causal-lm"}},
        resources=res,
        generation=generation,
        **spec,
    )
    return InferenceService.model_validate(body)


def container(isvc_: InferenceService) -> dict[str, Any]:
    dep = render_deployment(isvc_, "predictor", ModelLocation(str(isvc_.spec.model.source)), 1, CFG)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(c)


@dataclass
class Case:
    id: str
    model: str
    gpus: int
    generation: dict[str, int]
    argv: list[str]
    env: dict[str, str]
    expect_error: str | None = None  # vLLM must refuse, with this in its message
    extra: dict[str, Any] = field(default_factory=dict)


def matrix() -> list[Case]:
    """Rendered vLLM containers: {hf, pvc} x the two models x {1, 2, 8} GPUs x {no limits, limits},
    and a few single cases (a length the model does not have, many concurrent sequences)."""
    cases = []

    def add(case_id: str, model: str, gpus: int, gen: dict[str, int], source: str, **kw: Any) -> None:
        c = container(isvc(source, gpus, gen))
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        cases.append(Case(case_id, model, gpus, gen, [*c["command"], *c["args"]], env, **kw))

    for model in MODELS:
        for kind, source in (("hf", f"hf://{HF_ORG}/{model}"), ("pvc", f"pvc://models/{model}")):
            for gpus in GPUS:
                for name, gen in GENERATIONS.items():
                    add(f"{kind}-{model}-{gpus}gpu-{name}", model, gpus, gen, source)
    # a user-set length beyond the model's positions: vLLM refuses to start (the operator cannot know)
    add(
        "pvc-tiny-256-1gpu-length-4096",
        "tiny-256",
        1,
        {"maxModelLength": 4096},
        "pvc://models/tiny-256",
        expect_error="User-specified max_model_len (4096) is greater than the derived max_model_len",
    )
    add(
        "pvc-tiny-128k-1gpu-4096-seqs",
        "tiny-128k",
        1,
        {"maxConcurrentSequences": 4096},
        "pvc://models/tiny-128k",
    )
    add(
        "pvc-tiny-128k-1gpu-2048-seqs",
        "tiny-128k",
        1,
        {"maxConcurrentSequences": 2048},
        "pvc://models/tiny-128k",
    )
    return cases


def problems(case: Case, r: dict[str, Any]) -> list[str]:
    """What is wrong with vLLM's answer `r` for `case` (empty: the contract holds)."""
    if case.expect_error is not None:
        ok = not r["ok"] and case.expect_error in r.get("error", "")
        return [] if ok else [f"vLLM should refuse with {case.expect_error!r}; got {r.get('error')}"]
    if not r["ok"]:
        return [f"vLLM refused {case.argv} at {r.get('stage')}: {r.get('error')}"]
    engine = r["engine"]
    positions = MODELS[case.model]
    length = case.generation.get("maxModelLength", positions)  # unset: the model's own
    seqs = case.generation.get("maxConcurrentSequences", 64)
    cap = case.generation.get("maxNewTokens")
    want: dict[str, Any] = {
        "served_model_name": "llm",
        "host": "0.0.0.0",
        "port": CFG.server_port,
        "tensor_parallel_size": case.gpus,
        "max_position_embeddings": positions,
        "max_model_len": length,
        "max_num_seqs": seqs,
        "default_sampling": {"max_tokens": cap} if cap else {},
    }
    out = [f"{k}: vLLM has {engine.get(k)!r}, expected {v!r}" for k, v in want.items() if engine.get(k) != v]
    # an hf:// model: vLLM found the id offline in the rendered HF_HOME (the model cache volume's hub)
    snapshot = f"/hf/hub/models--{HF_ORG}--{case.model}/snapshots/{REVISION}"
    if case.id.startswith("hf-") and not str(engine["model"]).endswith(snapshot):
        out.append(f"model: vLLM resolved {engine['model']!r}, not the snapshot in HF_HOME")
    if engine["max_num_batched_tokens"] < seqs:
        out.append(f"max_num_batched_tokens {engine['max_num_batched_tokens']} < max_num_seqs {seqs}")
    # request handling: maxNewTokens is a server-wide cap; without it, the rest of the context
    for req in r["requests"]:
        expected = min(x for x in (length - req["prompt_tokens"], req["max_tokens"], cap) if x is not None)
        if req["sampling_max_tokens"] != expected:
            out.append(
                f"request {req}: vLLM generates up to {req['sampling_max_tokens']}, expected {expected}"
            )
    return out


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("vllm-contract")
    cases = matrix()
    (hf_home,) = {c.env["HF_HOME"] for c in cases if c.id.startswith("hf-")}
    local_hf_home = tmp / "model-cache" / Path(hf_home).relative_to("/var/cache/tauon/models")
    for model, positions in MODELS.items():
        path = write_model(tmp / "pvc" / "models" / model, positions)
        write_hf_cache(local_hf_home / "hub", f"{HF_ORG}/{model}", path)
    spec = {
        "hf_home": str(local_hf_home),  # the rendered HF_HOME (on the model cache volume), mapped here
        "node_memory_gib": 512,
        "cases": [
            {"id": c.id, "argv": c.argv, "path_map": {PVC_ROOT: str(tmp / "pvc")}, "requests": REQUESTS}
            for c in cases
        ],
    }
    (tmp / "cases.json").write_text(json.dumps(spec, indent=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(SCRIPT), str(tmp / "cases.json"), str(tmp / "results.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads((tmp / "results.json").read_text())
    assert results["vllm"] == VLLM_VERSION
    by_id = {r["id"]: r for r in results["results"]}
    out = os.environ.get("TAUON_CONTRACT_RESULTS")
    if out:
        rows = [
            {**by_id[c.id], "expect_error": c.expect_error, "problems": problems(c, by_id[c.id])}
            for c in cases
        ]
        failed = [row["id"] for row in rows if row["problems"]]
        summary = {k: v for k, v in results.items() if k != "results"}
        summary.update({"cases": len(rows), "failed": failed, "results": rows})
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=1).replace(str(tmp), "$TMP") + "\n")
    return {c.id: (c, by_id[c.id]) for c in cases}


@pytest.mark.parametrize("case_id", [c.id for c in matrix()])
def test_vllm_accepts_what_the_operator_renders(
    contract: dict[str, tuple[Case, dict[str, Any]]], case_id: str
) -> None:
    case, result = contract[case_id]
    assert not problems(case, result), problems(case, result)


def test_s3_models_are_refused_for_vllm_and_auto_picks_tauon() -> None:
    """vLLM cannot read s3:// models: an explicit runtime vllm is refused (admission, and render for
    objects admitted before the rule); runtime auto serves them with the tauon runtime."""
    explicit = isvc("s3://models/tiny", 1, {}, runtime="vllm")
    with pytest.raises(InvalidSpec, match=r"s3:// models are served by the tauon runtime"):
        container(explicit)
    auto = isvc("s3://models/tiny", 2, {})
    assert resolve_runtime(auto, "causal-lm", "s3://models/tiny") == "tauon"
    c = container(auto)
    assert c["command"] == ["python", "-m", "tauon_serve.serve"]
