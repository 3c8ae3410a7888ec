"""vLLM's own checks on the argv the operator renders (run with the vLLM venv's python: `make vllm-env`).

    $TAUON_VLLM_CACHE/venv/bin/python hack/vllm/contract.py CASES.json RESULTS.json

CASES.json: {"hf_home": DIR or null, "node_memory_gib": N, "cases": [{"id", "argv", "path_map",
"requests"}]}: `argv` is the rendered container command plus args (`vllm serve MODEL ...`), `path_map`
maps the pod's paths (the model's mount) to local directories, `requests` are chat requests
({"prompt": str, "max_tokens": int | null}). For each case, in one process (vLLM imports in ~15 s):

1. the parser of `vllm serve` exactly as the `vllm` command builds it (vllm.entrypoints.cli.main: the
   serve subcommand, make_arg_parser) and its validate_parsed_serve_args;
2. AsyncEngineArgs.from_cli_args and create_engine_config(OPENAI_API_SERVER), as `vllm serve` does before
   it starts the engine: ModelConfig (the model's config.json from the local directory or HF_HOME,
   max_model_len against max_position_embeddings, the generation config override), the parallel config
   (tensor parallel size against the attention heads), the scheduler config (max_num_seqs against
   max_num_batched_tokens), the cache config;
3. request handling: the tokenizer vLLM loads for the model, then for each request the max_tokens vLLM's
   OpenAI chat handler computes (vllm.entrypoints.utils.get_max_tokens) and the SamplingParams it builds
   (ChatCompletionRequest.to_sampling_params with the model's default sampling parameters).

What is not vLLM on a GPU here, on purpose: this machine has no GPU, so vLLM runs on its CPU platform
(`vllm.platforms.cpu.CpuPlatform`, which the pip wheel does not pick by itself), with two machine facts
set: the engine defaults (max_num_batched_tokens, max_num_seqs) are those vLLM picks for a GPU under
70 GiB (the smallest defaults, 2048 tokens), and the node's memory (vLLM checks its swap space against it)
is `node_memory_gib`. No weights are loaded and no engine is started.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

GiB = 1 << 30


def _setup(spec: dict[str, Any]) -> None:
    """Environment before vLLM is imported: offline, HF_HOME, the CPU platform, the machine facts."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if spec.get("hf_home"):
        os.environ["HF_HOME"] = spec["hf_home"]

    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    # first: modules bind `current_platform` when they are imported
    platforms._current_platform = CpuPlatform()

    import vllm.config.cache as cache_config
    from vllm.engine.arg_utils import EngineArgs

    node_memory = int(spec.get("node_memory_gib", 512)) * GiB
    cache_config.get_cpu_memory = lambda: node_memory  # type: ignore[attr-defined]

    set_defaults = EngineArgs._set_default_args

    def gpu_defaults(self: Any, usage_context: Any, model_config: Any) -> None:
        plat = platforms.current_platform
        plat.is_cpu = lambda: False  # type: ignore[method-assign]  # the GPU branch of the defaults
        try:
            set_defaults(self, usage_context, model_config)
        finally:
            del plat.is_cpu

    EngineArgs._set_default_args = gpu_defaults  # type: ignore[method-assign]


def _serve_parser() -> tuple[Any, Any]:
    """The top-level `vllm` parser with its serve subcommand, as vllm.entrypoints.cli.main builds it."""
    import vllm.entrypoints.cli.serve as serve
    from vllm.utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    sub = parser.add_subparsers(required=False, dest="subparser")
    cmd = serve.ServeSubcommand()
    cmd.subparser_init(sub).set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def _mapped(argv: list[str], path_map: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for pod, local in path_map.items():
            if arg == pod or arg.startswith(pod.rstrip("/") + "/"):
                arg = local.rstrip("/") + arg[len(pod.rstrip("/")) :]
        out.append(arg)
    return out


def _requests(cfg: Any, served: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from vllm.entrypoints.openai.protocol import ChatCompletionRequest
    from vllm.entrypoints.utils import get_max_tokens
    from vllm.transformers_utils.tokenizer import init_tokenizer_from_configs

    model_config = cfg.model_config
    tokenizer = init_tokenizer_from_configs(model_config)
    defaults = model_config.get_diff_sampling_param()
    out = []
    for r in requests:
        req = ChatCompletionRequest(
            model=served, messages=[{"role": "user", "content": r["prompt"]}], max_tokens=r.get("max_tokens")
        )
        n_prompt = len(tokenizer.encode(r["prompt"]))
        max_tokens = get_max_tokens(model_config.max_model_len, req, n_prompt, defaults)
        params = req.to_sampling_params(max_tokens, model_config.logits_processor_pattern, defaults)
        out.append(
            {
                "max_tokens": r.get("max_tokens"),
                "prompt_tokens": n_prompt,
                "sampling_max_tokens": params.max_tokens,
            }
        )
    return out


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    argv = list(case["argv"])
    result: dict[str, Any] = {"id": case["id"], "argv": argv}
    if argv[:2] != ["vllm", "serve"]:
        return {**result, "ok": False, "stage": "command", "error": f"not `vllm serve ...`: {argv[:2]}"}
    stage = "parse"
    try:
        parser, cmd = _serve_parser()
        args = parser.parse_args(_mapped(argv[1:], case.get("path_map") or {}))
        cmd.validate(args)
        if getattr(args, "model_tag", None) is not None:  # ServeSubcommand.cmd: the positional wins
            args.model = args.model_tag
        stage = "config"
        engine_args = AsyncEngineArgs.from_cli_args(args)
        cfg = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        mc, pc, sc = cfg.model_config, cfg.parallel_config, cfg.scheduler_config
        result["engine"] = {
            "model": mc.model,
            "served_model_name": mc.served_model_name,
            "max_model_len": mc.max_model_len,
            "max_position_embeddings": getattr(mc.hf_text_config, "max_position_embeddings", None),
            "tensor_parallel_size": pc.tensor_parallel_size,
            "max_num_seqs": sc.max_num_seqs,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "default_sampling": mc.get_diff_sampling_param(),
            "host": args.host,
            "port": args.port,
        }
        stage = "requests"
        result["requests"] = _requests(cfg, mc.served_model_name, case.get("requests") or [])
    except BaseException as e:  # argparse exits (SystemExit), pydantic and vLLM raise ValueError & co.
        if isinstance(e, KeyboardInterrupt):
            raise
        lines = traceback.format_exception_only(type(e), e)
        return {**result, "ok": False, "stage": stage, "error": "".join(lines).strip()[-2000:]}
    return {**result, "ok": True}


def main(argv: list[str]) -> int:
    cases_path, results_path = argv
    with open(cases_path) as f:
        spec = json.load(f)
    t0 = time.monotonic()
    _setup(spec)
    import vllm

    results = []
    for case in spec["cases"]:
        t = time.monotonic()
        results.append({**run_case(case), "seconds": round(time.monotonic() - t, 3)})
    out = {
        "vllm": vllm.__version__,
        "platform": "cpu (vLLM's CpuPlatform; GPU engine defaults for a GPU under 70 GiB)",
        "node_memory_gib": spec.get("node_memory_gib", 512),
        "seconds": round(time.monotonic() - t0, 1),
        "results": results,
    }
    with open(results_path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
