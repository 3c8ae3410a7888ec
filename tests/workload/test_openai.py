"""The OpenAI-compatible API of a REAL model server process (``python -m tauon_serve.serve``) serving a
tiny random Llama saved with ``save_pretrained`` and the repo's tiny BPE tokenizer
(examples/tokenizers/tiny-llama), talked to with the official ``openai`` client and with httpx.

The model's special-token rows of ``lm_head`` are zeroed and the others scaled up, so that decoding never
picks EOS (or a token that decodes to nothing): lengths are exact and the long request really is long.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.manifests import TINY_TOKENIZER
from tests.net import free_port
from tests.workload.helpers import Server, http_status, running_server, wait_for, wait_ready

NAME = "tiny-llama"
MAX_MODEL_LENGTH = 2048
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class LM:
    path: Path
    reference: dict[str, str]  # prompt -> greedy continuation of 8 tokens from model.generate


REF_PROMPTS = ["hello world", "the cat sat on the mat and"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LM:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight *= 100  # peaky logits (std ~16): sampling at T<1 stays far from the zeroed rows
        for special in tok.all_special_ids:  # logit 0 while the best token's is far above: never picked
            model.lm_head.weight[special].zero_()
    path = tmp_path_factory.mktemp("lm") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    reference = {}
    with torch.inference_mode():
        for prompt in REF_PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
            reference[prompt] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            assert len(reference[prompt]) >= 8
    return LM(path, reference)


@pytest.fixture(scope="module")
def server(lm: LM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        lm.path,
        tmp_path_factory.mktemp("openai-server"),
        f"--max-model-length={MAX_MODEL_LENGTH}",
        f"--max-new-tokens={MAX_NEW_TOKENS}",
        name=NAME,
        env={"TAUON_MAX_CONCURRENT_SEQUENCES": "40"},  # through the environment, as the operator renders it
    ) as srv:
        yield wait_ready(srv)


@pytest.fixture(scope="module")
def long_server(lm: LM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose --max-new-tokens (a server-wide cap on max_tokens) allows long answers."""
    with running_server(
        lm.path,
        tmp_path_factory.mktemp("openai-long-server"),
        f"--max-model-length={MAX_MODEL_LENGTH}",
        f"--max-new-tokens={MAX_MODEL_LENGTH}",
        name=NAME,
    ) as srv:
        yield wait_ready(srv)


def bases(server: Server) -> list[str]:
    return [server.url + "/v1"]  # only /v1, as vLLM: one base URL on both runtimes (issue 21)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def scrape(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


# -- the openai client -----------------------------------------------------------------------------


def test_models_list_on_v1_and_no_openai_prefix(server: Server) -> None:
    for base in bases(server):
        models = client(base).models.list()
        assert [m.id for m in models.data] == [NAME]
        assert models.data[0].object == "model" and models.data[0].owned_by == "tauon"
    kserve = httpx.get(server.url + "/v1/models").json()
    assert kserve["models"] == [NAME] and kserve["object"] == "list"
    for path in ("/openai/v1/models", "/openai/v1/completions", "/openai/v1/chat/completions"):
        method = "GET" if path.endswith("models") else "POST"
        assert httpx.request(method, server.url + path, json={}, timeout=10).status_code == 404, path


def test_completions_match_direct_greedy_generation(server: Server, lm: LM) -> None:
    for base in bases(server):
        c = client(base)
        for prompt, expected in lm.reference.items():
            r = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
            assert r.choices[0].text == expected
            assert r.choices[0].finish_reason == "length"
            assert r.usage is not None and r.usage.completion_tokens == 8
            assert r.usage.total_tokens == r.usage.prompt_tokens + 8
        default = c.completions.create(model=NAME, prompt="hi", temperature=0)
        assert default.usage is not None and default.usage.completion_tokens == MAX_NEW_TOKENS


def test_chat_completions_non_streaming(server: Server) -> None:
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for base in bases(server):
        c = client(base)
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0.8, seed=7)
        again = c.chat.completions.create(
            model=NAME, messages=messages, max_tokens=5, temperature=0.8, seed=7
        )
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == again.choices[0].message.content  # same seed, same sample
        assert r.usage is not None and r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 3
        stopped = c.chat.completions.create(
            model=NAME, messages=messages, max_tokens=12, temperature=0, stop=[" ", "e"]
        )
        text = stopped.choices[0].message.content or ""
        assert " " not in text and "e" not in text


def test_streaming_chat_and_completions(server: Server) -> None:
    for base in bases(server):
        c = client(base)
        chunks = list(
            c.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 6
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        full = c.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        assert streamed == full.choices[0].message.content
        text_chunks = list(c.completions.create(model=NAME, prompt="hello", max_tokens=4, stream=True))
        assert text_chunks[-1].choices[0].finish_reason == "length"
        assert all(ch.usage is None for ch in text_chunks)


def test_sse_framing_ends_with_done(server: Server) -> None:
    body = {"model": NAME, "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    payloads = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert all(f.startswith("data: ") for f in frames[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "text_completion" and p["model"] == NAME for p in payloads)


# -- errors ----------------------------------------------------------------------------------------

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": NAME, "prompt": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
        ("completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
        ("chat/completions", {**CHAT, "n": 2}, 400, "n"),
        ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
        (
            "chat/completions",
            {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        ("completions", {**COMPLETION, "prompt": "word " * 3000}, 400, "prompt"),
        ("completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {**COMPLETION, "max_tokens": -5}, 400, "max_tokens"),
        ("completions", {**COMPLETION, "max_tokens": MAX_MODEL_LENGTH}, 400, "max_tokens"),
        ("chat/completions", {**CHAT, "temperature": -0.1}, 400, "temperature"),
        ("completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("completions", {**COMPLETION, "logprobs": 2}, 400, "logprobs"),
        ("chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
        ("chat/completions", {**CHAT, "mystery": 1}, 400, "mystery"),
    ],
)
def test_bad_requests_get_openai_errors(
    server: Server, path: str, body: Any, status: int, param: str
) -> None:
    for base in bases(server):
        r = httpx.post(f"{base}/{path}", json=body, timeout=30)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    if status == 404:
        assert err["code"] == "model_not_found"


def test_non_json_and_huge_bodies(server: Server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    huge = b'{"model": "x", "prompt": "' + b"a" * (3 * 1024 * 1024) + b'"}'  # over --max-openai-body-bytes
    r = httpx.post(server.url + "/v1/completions", content=huge, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert "--max-openai-body-bytes" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(server.url + "/v1").completions.create(model="nope", prompt="x")


# -- continuous batching ---------------------------------------------------------------------------


def test_short_request_finishes_before_a_running_long_one(long_server: Server) -> None:
    server = long_server

    async def run() -> tuple[float, float, float]:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        t0 = time.monotonic()
        started = asyncio.Event()

        async def long() -> float:
            stream = await c.completions.create(
                model=NAME, prompt="a long story", max_tokens=200, temperature=0, stream=True
            )
            async for _ in stream:
                started.set()
            return time.monotonic() - t0

        async def short() -> float:
            await started.wait()
            r = await c.completions.create(model=NAME, prompt="short", max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.completion_tokens == 4
            return time.monotonic() - t0

        long_task = asyncio.create_task(long())
        short_done = await short()
        long_done = await long_task
        return short_done, long_done, t0

    short_done, long_done, _ = asyncio.run(run())
    assert short_done < long_done, (short_done, long_done)


def test_32_concurrent_streams_complete(server: Server) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
        stream = await c.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=8 + i % 5,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage, reason = 0, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        return usage, reason

    async def run() -> list[tuple[int, str | None]]:
        c = openai.AsyncOpenAI(
            base_url=server.url + "/v1",
            api_key="unused",
            max_retries=0,
            timeout=180,
            http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=64)),
        )
        return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(run())
    assert results == [(8 + i % 5, "length") for i in range(32)]


def test_closing_a_stream_frees_its_sequence(long_server: Server) -> None:
    server = long_server
    before = scrape(server)["tauon_server_generated_tokens_total"]
    body = {"model": NAME, "prompt": "go on", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert scrape(server)["tauon_server_running_sequences"] >= 1
    deadline = time.monotonic() + 10
    while scrape(server)["tauon_server_running_sequences"] != 0:
        assert time.monotonic() < deadline, "the closed stream's sequence is still running"
        time.sleep(0.05)
    generated = scrape(server)["tauon_server_generated_tokens_total"] - before
    assert generated < 2000, generated
    m = scrape(server)
    assert m["tauon_server_time_to_first_token_seconds_count"] > 0
    assert m["tauon_server_time_per_output_token_seconds_count"] > 0


def test_kserve_v1_and_v2_still_generate(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/models/{NAME}:predict", json={"instances": ["hello world"]}, timeout=60)
    assert r.status_code == 200
    text = r.json()["predictions"][0]["generatedText"]
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello world"]}]}
    r2 = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=v2, timeout=60)
    assert r2.status_code == 200 and r2.json()["outputs"][0]["data"] == [text]
    c = client(server.url + "/v1")
    same = c.completions.create(model=NAME, prompt="hello world", max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert same.choices[0].text == text


# -- graceful shutdown -----------------------------------------------------------------------------


def test_sigterm_drains_and_ends_a_long_stream_with_a_final_frame(
    lm: LM, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On SIGTERM readiness (on --health-port) turns 503 at once while liveness stays 200; a short
    request in flight finishes; a stream still running at --graceful-timeout-seconds ends with an error
    frame and ``data: [DONE]`` instead of a cut connection; the process exits 0."""
    health = f"http://127.0.0.1:{free_port()}"
    with running_server(
        lm.path,
        tmp_path_factory.mktemp("drain-server"),
        f"--max-model-length={MAX_MODEL_LENGTH}",
        "--graceful-timeout-seconds=1",
        f"--health-port={health.rsplit(':', 1)[1]}",
        name=NAME,
    ) as srv:
        wait_ready(srv)
        # the long streams must outlast the 1 s grace on a quiet machine too (the tiny model makes
        # ~1000 tokens/s alone): the whole room, and three of them batched together
        room = MAX_MODEL_LENGTH - 16
        long_body = {"model": NAME, "prompt": "go on", "max_tokens": room, "stream": True}
        short_body = {"model": NAME, "prompt": "x", "max_tokens": 30, "stream": True}
        url = srv.url + "/v1/completions"
        with (
            httpx.stream("POST", url, json=long_body, timeout=60) as long_r,
            httpx.stream("POST", url, json=long_body, timeout=60) as other_r,
            httpx.stream("POST", url, json=long_body, timeout=60) as third_r,
            httpx.stream("POST", url, json=short_body, timeout=60) as short_r,
        ):
            long_lines, short_lines = long_r.iter_lines(), short_r.iter_lines()
            lines = [next(long_lines) for _ in range(4)]
            short = [next(short_lines)]  # all in flight
            others = [other_r.iter_lines(), third_r.iter_lines()]
            for it in others:
                next(it)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: http_status(health + "/v2/health/ready") == 503, 2, "not ready after SIGTERM")
            assert http_status(health + "/v2/health/live") == 200
            lines += list(long_lines)
            ended = time.monotonic() - t0
            short += list(short_lines)
            for it in others:
                assert [line for line in it if line][-1] == "data: [DONE]"
        assert srv.proc.wait(timeout=30) == 0
    frames = [line.removeprefix("data: ") for line in lines if line]
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["error"]["code"] == "unavailable" and "shut down" in last["error"]["message"], last
    assert 0.8 < ended < 8, ended
    short_frames = [line.removeprefix("data: ") for line in short if line]
    assert short_frames[-1] == "[DONE]"  # the short stream finished within the grace period
    assert json.loads(short_frames[-2])["choices"][0]["finish_reason"] == "length"
