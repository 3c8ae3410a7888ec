"""Pure tests of the trainer's large-model pieces: output ownership and fencing, path containment,
durable swaps, the strategy estimate, and model configs for init: scratch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tauon_core.errors import PermanentError
from tauon_train import output as out_mod
from tauon_train import strategy
from tauon_train.config import parse_config
from tests.workload.helpers import TINY_TOKENIZER, llama_job

# --- uid and path ------------------------------------------------------------------------------


def test_uid_from_job_json_must_match_the_pod() -> None:
    out_mod.check_uid("u1", {"TAUON_JOB_UID": "u1"})
    out_mod.check_uid("u1", {})  # not under the operator (hand-run)
    out_mod.check_uid("u1", {"TAUON_JOB_UID": ""})
    with pytest.raises(PermanentError) as e:
        out_mod.check_uid("u1", {"TAUON_JOB_UID": "u2"})
    assert e.value.reason == "ForeignConfig" and "u1" in e.value.message and "u2" in e.value.message


@pytest.mark.parametrize("raw", ["/mnt/pvc/c/../../tmp/x", "/mnt/pvc/c/./x", "/mnt/pvc/c//x", "a/../b"])
def test_output_path_with_dot_segments_is_refused(raw: str) -> None:
    with pytest.raises(PermanentError) as e:
        out_mod.check_output_path(raw, None)
    assert e.value.reason == "InvalidOutput" and raw in e.value.message


def test_output_may_be_an_s3_prefix_and_other_schemes_are_refused() -> None:
    cfg = parse_config(llama_job(Path("/x"), output={"storage": "s3://b/runs/a/", "path": "s3://b/runs/a/"}))
    assert cfg.output.path == "s3://b/runs/a/"
    assert out_mod.check_output_path(cfg.output.path, "/mnt/ignored") == "s3://b/runs/a"
    assert out_mod.check_output_path("s3://b", None) == "s3://b"
    for bad in ("s3:///runs", "s3://b/runs//a", "s3://b/runs/../a", "s3://b/./a"):
        with pytest.raises(PermanentError) as e:
            out_mod.check_output_path(bad, None)
        assert e.value.reason == "InvalidOutput" and bad in e.value.message
    with pytest.raises(PermanentError) as e:
        parse_config(llama_job(Path("/x"), output={"storage": "gs://b/a", "path": "gs://b/a"}))
    assert e.value.reason == "InvalidConfig" and "s3://bucket/prefix" in e.value.message


def test_output_path_must_resolve_inside_its_mount(tmp_path: Path) -> None:
    mount, outside = tmp_path / "mnt", tmp_path / "outside"
    (mount / "sub").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, mount / "link")
    assert out_mod.check_output_path(str(mount / "sub" / "out"), str(mount)) == str(mount / "sub" / "out")
    assert out_mod.check_output_path(str(mount), str(mount)) == str(mount)
    with pytest.raises(PermanentError) as e:
        out_mod.check_output_path(str(mount / "link" / "out"), str(mount))
    assert e.value.reason == "InvalidOutput" and str(outside) in e.value.message
    os.symlink(tmp_path / "mnt-evil", mount / "l2")  # prefix trick: /mnt-evil is not under /mnt
    with pytest.raises(PermanentError):
        out_mod.check_output_path(str(mount / "l2"), str(mount))


# --- ownership and fencing ---------------------------------------------------------------------


def test_first_start_claims_the_output_and_later_attempts_raise_the_fence(tmp_path: Path) -> None:
    out = tmp_path / "out"
    owner = out_mod.claim(str(out), "u1", "ns/job", 0)
    assert owner["uid"] == "u1"
    on_disk = json.loads((out / ".tauon-owner.json").read_text())
    assert on_disk["uid"] == "u1" and on_disk["attempt"] == 0 and on_disk["job"] == "ns/job"
    out_mod.claim(str(out), "u1", "ns/job", 2)  # a restart of the same job
    assert json.loads((out / ".tauon-owner.json").read_text())["attempt"] == 2
    out_mod.check_fence(str(out), 2)
    with pytest.raises(out_mod.Superseded):
        out_mod.check_fence(str(out), 1)  # an old pod of attempt 1 must not write
    with pytest.raises(out_mod.Superseded):
        out_mod.claim(str(out), "u1", "ns/job", 1)


def test_another_jobs_output_is_refused_without_touching_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out_mod.claim(str(out), "u1", "ns/a", 5)
    before = (out / ".tauon-owner.json").read_bytes()
    with pytest.raises(PermanentError) as e:
        out_mod.claim(str(out), "u2", "ns/b", 0)
    assert e.value.reason == "OutputInUse"
    assert str(out) in e.value.message and "u1" in e.value.message
    assert (out / ".tauon-owner.json").read_bytes() == before


def test_results_without_an_owner_file_are_not_adopted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    with pytest.raises(PermanentError) as e:
        out_mod.claim(str(out), "u1", "ns/a", 0)
    assert e.value.reason == "OutputInUse" and not (out / ".tauon-owner.json").exists()
    out_mod.claim(str(out), "", "ns/a", 0)  # a hand-written job.json (no uid) may use it


# --- durable swaps -----------------------------------------------------------------------------


def _dir(p: Path, content: str) -> Path:
    p.mkdir(parents=True)
    (p / "config.json").write_text(content)
    return p


def test_swap_in_replaces_the_model_and_leaves_no_temporaries(tmp_path: Path) -> None:
    final = tmp_path / "model"
    out_mod.swap_in(str(_dir(tmp_path / ".tmp-model-1", "v1")), str(final))
    assert (final / "config.json").read_text() == "v1"
    out_mod.swap_in(str(_dir(tmp_path / ".tmp-model-2", "v2")), str(final))
    assert (final / "config.json").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_clean_stale_removes_temporaries_and_restores_an_interrupted_swap(tmp_path: Path) -> None:
    _dir(tmp_path / ".tmp-model-abcd", "partial")
    _dir(tmp_path / ".tmp-adapter-ef01", "partial")
    _dir(tmp_path / ".old-model-1234", "previous")  # crash between the two renames: no model/
    done = out_mod.clean_stale(str(tmp_path))
    assert len(done) == 3
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert (tmp_path / "model" / "config.json").read_text() == "previous"


# --- strategy ----------------------------------------------------------------------------------


def test_state_estimate_counts_only_trainable_parameters_for_gradients_and_adam() -> None:
    assert strategy.state_bytes(1000, 1000, bf16=False) == 16_000
    assert strategy.state_bytes(1000, 10, bf16=False) == 4000 + 120
    assert strategy.state_bytes(1000, 1000, bf16=True) == 2000 + 14_000  # + fp32 master weights
    est = strategy.estimate(10**9, 10**9, False, 4, device_bytes=80 * 2**30)
    assert est.replicated_bytes == 16 * 10**9 and est.sharded_bytes == 4 * 10**9


def test_auto_picks_fsdp_above_60_percent_of_the_device() -> None:
    dev = 100 * 2**30
    big = strategy.estimate(5 * 10**9, 5 * 10**9, False, 2, dev)  # 80 GB > 60 GiB
    small = strategy.estimate(10**9, 10**9, False, 2, dev)  # 16 GB
    assert strategy.resolve("auto", big, True, 2)[0] == "fsdp"
    assert strategy.resolve("auto", small, True, 2)[0] == "ddp"
    assert strategy.resolve("ddp", big, True, 2)[0] == "ddp"  # explicit wins
    assert strategy.resolve("fsdp", small, True, 2)[0] == "fsdp"
    assert strategy.resolve("fsdp", big, False, 1)[0] == "ddp"  # one process: nothing to shard
    lora = strategy.estimate(5 * 10**9, 10**7, False, 2, dev)  # frozen base: 20 GB + little
    assert strategy.resolve("auto", lora, True, 2)[0] == "ddp"


def test_transformer_blocks_are_the_decoder_layers() -> None:
    from tauon_train.modeling import build_on_meta

    cfg = parse_config(llama_job(Path("/tmp/unused-out"), "fsdp"))
    from tauon_train.modeling import build_hf_config, load_tokenizer_for

    hf = build_hf_config(cfg, "", load_tokenizer_for(cfg, ""))
    model = build_on_meta(cfg, hf)
    blocks = strategy.transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer", "LlamaDecoderLayer"]


# --- init: scratch -----------------------------------------------------------------------------


def _scratch(**config: object) -> PermanentError:
    from tauon_train.modeling import build_hf_config, load_tokenizer_for

    raw = llama_job(Path("/tmp/unused-out"), "fsdp")
    raw["model"]["config"] = config
    cfg = parse_config(raw)
    with pytest.raises(PermanentError) as e:
        build_hf_config(cfg, "", load_tokenizer_for(cfg, ""))
    return e.value


def test_scratch_config_fills_the_tokenizer_and_rejects_bad_configs() -> None:
    from tauon_train.modeling import build_hf_config, load_tokenizer_for

    cfg = parse_config(llama_job(Path("/tmp/unused-out"), "fsdp"))
    tok = load_tokenizer_for(cfg, "")
    hf = build_hf_config(cfg, "", tok)
    assert hf.model_type == "llama" and hf.vocab_size == len(tok) and hf.pad_token_id == tok.pad_token_id
    e = _scratch(model_type="no-such-architecture", hidden_size=32)
    assert e.reason == "InvalidModelConfig" and "no-such-architecture" in e.message
    e = _scratch(hidden_size=32)
    assert e.reason == "InvalidModelConfig" and "model_type" in e.message
    e = _scratch(model_type="llama", vocab_size=10)
    assert e.reason == "InvalidModelConfig" and "vocab_size" in e.message


def test_the_shipped_tokenizer_has_special_tokens_and_a_chat_template() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert "<|assistant|>" in text and "hello</s>" in text
    assert tok.decode(tok("Mulch keeps the soil cool.").input_ids, skip_special_tokens=True) == (
        "Mulch keeps the soil cool."
    )


def test_attempt_comes_from_the_pod_environment() -> None:
    assert out_mod.current_attempt(0, {"TAUON_ATTEMPT": "3"}) == 3
    assert out_mod.current_attempt(2, {}) == 2
    assert out_mod.current_attempt(4, {"TAUON_ATTEMPT": "1"}) == 4
    with pytest.raises(PermanentError):
        out_mod.current_attempt(0, {"TAUON_ATTEMPT": "x"})
