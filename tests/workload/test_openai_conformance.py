"""One OpenAI conformance suite for both runtimes, with the official ``openai`` client. Its only inputs
are a base URL and a model name:

    TAUON_CONFORMANCE_BASE_URL=http://127.0.0.1:8000/v1 TAUON_CONFORMANCE_MODEL=llm \\
        .venv/bin/pytest -q tests/workload/test_openai_conformance.py

runs it against any server (a `vllm serve` of an InferenceService, a port-forwarded Service: the base URL is
status.openai.baseURL's path on a reachable host). Without them (``make test``) it starts the tauon model
server (``python -m tauon_serve.serve``) on a tiny random Llama and the repo's tiny tokenizer.

Only what the OpenAI API promises and both runtimes do is asserted: the shapes of models, completions
and chat completions, streaming with ``stream_options.include_usage`` (a last chunk with no choices and
the usage), and error bodies ({"error": {"message", "type", ...}}) for an unknown model (404) and bad
parameters (400). Runtime-specific behaviour stays in tests/workload/test_openai.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.manifests import TINY_TOKENIZER
from tests.workload.helpers import running_server, wait_ready

MAX_TOKENS = 5


@dataclass(frozen=True)
class Target:
    base_url: str  # ends in /v1
    model: str


def _tiny_llama(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = root / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    base, model = os.environ.get("TAUON_CONFORMANCE_BASE_URL"), os.environ.get("TAUON_CONFORMANCE_MODEL")
    if base and model:
        yield Target(base.rstrip("/"), model)
        return
    tmp = tmp_path_factory.mktemp("conformance")
    with running_server(_tiny_llama(tmp), tmp, "--max-new-tokens=16", name="tiny-llama") as srv:
        wait_ready(srv)
        yield Target(srv.url + "/v1", "tiny-llama")


def client(t: Target) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.base_url, api_key="unused", max_retries=0, timeout=60)


def _usage_adds_up(usage: openai.types.CompletionUsage | None, limit: int) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0 and 0 <= usage.completion_tokens <= limit
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_models_list_names_the_model(target: Target) -> None:
    models = client(target).models.list()
    assert target.model in [m.id for m in models.data]
    assert all(m.object == "model" for m in models.data)


def test_completion(target: Target) -> None:
    r = client(target).completions.create(
        model=target.model, prompt="hello world", max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.object == "text_completion" and r.model == target.model and r.id
    (choice,) = r.choices
    assert choice.index == 0 and isinstance(choice.text, str)
    assert choice.finish_reason in ("length", "stop")
    _usage_adds_up(r.usage, MAX_TOKENS)


def test_chat_completion(target: Target) -> None:
    r = client(target).chat.completions.create(
        model=target.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.model == target.model and r.id
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    _usage_adds_up(r.usage, MAX_TOKENS)


def test_streaming_chat_with_usage(target: Target) -> None:
    chunks = list(
        client(target).chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.model == target.model for c in chunks)
    *body, last = chunks
    assert body and all(c.choices and c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    finished = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason is not None]
    assert len(finished) == 1 and finished[0] in ("length", "stop")
    assert last.choices == []  # include_usage: one last chunk with the usage and no choices
    _usage_adds_up(last.usage, MAX_TOKENS)


def test_streaming_completion_with_usage(target: Target) -> None:
    chunks = list(
        client(target).completions.create(
            model=target.model,
            prompt="hello",
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert body and all(c.object == "text_completion" and c.choices and c.usage is None for c in body)
    assert last.choices == []
    _usage_adds_up(last.usage, MAX_TOKENS)


def _error(target: Target, path: str, body: dict[str, object], status: int) -> dict[str, object]:
    r = httpx.post(f"{target.base_url}/{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return dict(err)


def test_unknown_model_is_404_with_an_error_body(target: Target) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client(target).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.status_code == 404
    _error(target, "completions", {"model": "no-such-model", "prompt": "x"}, 404)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ("chat/completions", {"temperature": -0.5}),
        ("completions", {"max_tokens": -5}),
        ("chat/completions", {"messages": "not a list"}),
    ],
)
def test_bad_parameters_are_400_with_an_error_body(target: Target, path: str, bad: dict[str, object]) -> None:
    body: dict[str, object] = {"model": target.model, "max_tokens": MAX_TOKENS}
    body.update(
        {"messages": [{"role": "user", "content": "x"}]} if path.startswith("chat") else {"prompt": "x"}
    )
    body.update(bad)
    _error(target, path, body, 400)
    with pytest.raises(openai.BadRequestError):
        client(target).post(f"/{path}", body=body, cast_to=httpx.Response)
