"""``parallelism.compile`` without compiling: the trainer's parsing, the ``auto`` resolution (off on CPU)
and where it is recorded, the bucketed padding of compiled runs (which must not change a loss) and the
compile-time accounting. The compiled training itself: tests/workload/test_compile.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tauon_core.errors import PermanentError
from tauon_train import prepare, strategy, train
from tauon_train.config import ParallelismConfig, parse_config
from tauon_train.data import IGNORE, Collator
from tauon_train.dist import DistEnv
from tauon_train.metrics import compile_extra_seconds
from tests.manifests import TINY_LLAMA

BASE: dict[str, Any] = {
    "model": {"source": "file:///m", "path": "/m", "task": "causal-lm"},
    "dataset": {"path": "/d.jsonl"},
    "output": {"path": "/out"},
}


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "auto"), ("auto", "auto"), (True, "true"), (False, "false"), ("true", "true")]
)
def test_config_parses_compile(value: object, mode: str) -> None:
    par = {} if value is None else {"compile": value}
    assert parse_config({**BASE, "parallelism": par}).parallelism.compile == mode


@pytest.mark.parametrize("value", ["on", 1, "yes", []])
def test_config_refuses_other_compile_values(value: object) -> None:
    with pytest.raises(PermanentError, match=r"parallelism\.compile must be true, false or auto"):
        parse_config({**BASE, "parallelism": {"compile": value}})


@pytest.mark.parametrize(
    ("mode", "device", "on"),
    [
        ("auto", "cpu", False),
        ("auto", "cuda", True),
        ("true", "cpu", True),
        ("false", "cuda", False),
        ("false", "cpu", False),
    ],
)
def test_resolve_compile(mode: str, device: str, on: bool) -> None:
    assert strategy.resolve_compile(mode, torch.device(device)) is on


def test_plan_on_cpu_resolves_auto_off_and_says_so() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cpu = torch.device("cpu")
    plan = strategy.make_plan(model, ParallelismConfig(), strategy.FP32, cpu, DistEnv())
    assert plan.compile is False and plan.describe().endswith("compile=off")
    on = strategy.make_plan(model, ParallelismConfig(compile="true"), strategy.FP32, cpu, DistEnv())
    assert on.compile is True and on.describe().endswith("compile=on")


def _trainer(compiled_blocks: int, steps: list[float], compiled: list[int]) -> Any:
    """The parts of a Trainer that ``resolved`` and ``compile_metrics`` read."""
    est = strategy.Estimate(10, 10, 160, 80, 0)
    setup = SimpleNamespace(
        strategy="ddp", estimate=est, parallel=SimpleNamespace(compiled_blocks=compiled_blocks)
    )
    return SimpleNamespace(
        prep=SimpleNamespace(train_ds=None),
        setup=setup,
        d=DistEnv(),
        times=SimpleNamespace(step_seconds=steps),
        compiled_steps=compiled,
        initial_eval_seconds=3.0,
    )


def test_resolved_and_metrics_record_compile() -> None:
    off = _trainer(0, [1.0, 1.0], [])
    assert train.Trainer.resolved(off) == {"strategy": "ddp", "estimateBytes": 160, "compile": False}
    assert train.Trainer.compile_metrics(off, 1.0) == {"compile": False}
    on = _trainer(2, [9.0, 1.0, 1.5, 1.0], [0])
    assert train.Trainer.resolved(on)["compile"] is True
    m = train.Trainer.compile_metrics(on, 1.0)
    # step 0 took 8 s more than the median of the others, the initial evaluation 2 s more than the final
    assert m["compile"] is True and m["compileSeconds"] == pytest.approx(10.0)
    assert isinstance(m["compiledGraphs"], int)


def test_compile_extra_seconds() -> None:
    assert compile_extra_seconds([10.0, 1.0, 2.0, 1.0, 1.2], [0]) == pytest.approx(8.8)
    assert compile_extra_seconds([10.0, 1.0, 5.0, 1.0], [0, 2]) == pytest.approx(13.0)
    assert compile_extra_seconds([4.0], [0]) == 4.0  # every step compiled: all of it counts
    assert compile_extra_seconds([1.0, 2.0], []) == 0.0
    assert compile_extra_seconds([0.5, 1.0, 1.0], [0]) == 0.0  # never negative


@pytest.mark.parametrize(
    ("width", "max_len", "padded"),
    [(1, 512, 64), (64, 512, 64), (65, 512, 128), (500, 512, 512), (40, 48, 48)],
)
def test_bucket_length(width: int, max_len: int, padded: int) -> None:
    assert prepare.bucket_length(width, max_len) == padded


def _packed_items() -> list[dict[str, torch.Tensor]]:
    """Two packed rows (21 and 9 tokens), the first two tokens of each example masked (chat prompts)."""
    items = []
    for lengths in ((12, 9), (9,)):
        ids = torch.arange(3, 3 + sum(lengths)) % 50 + 3
        pos = torch.cat([torch.arange(n) for n in lengths])
        labels = torch.where(pos < 2, torch.full_like(ids, IGNORE), ids)
        items.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return items


def test_bucketed_collator_pads_packed_rows_as_the_collator_does() -> None:
    items = _packed_items()
    plain = Collator(0, "causal-lm", True)(items)
    got = prepare.BucketedCollator(0, "causal-lm", True, 48)(items)
    assert set(got) == set(plain) == {"input_ids", "labels", "position_ids"}
    assert got["input_ids"].shape == (2, 48) and plain["input_ids"].shape == (2, 21)
    for k in got:
        assert torch.equal(got[k][:, :21], plain[k]), k
    assert (got["input_ids"][:, 21:] == 0).all() and (got["labels"][:, 21:] == IGNORE).all()
    # row 0 was full: its padding starts a segment at 0; row 1's padding segment (from 9) continues
    assert got["position_ids"][0, 21:].tolist() == list(range(27))
    assert got["position_ids"][1, 9:].tolist() == list(range(39))
    # what the collator itself writes when it pads that far
    wide = Collator(0, "causal-lm", True)([*items, {"input_ids": torch.ones(48, dtype=torch.long)}])
    assert torch.equal(got["position_ids"], wide["position_ids"][:2])


def test_bucketed_collator_padded_and_classification_batches() -> None:
    items = [{"input_ids": torch.tensor([5, 6, 7]), "label": 1}, {"input_ids": torch.tensor([5]), "label": 0}]
    got = prepare.BucketedCollator(1, "sequence-classification", False, 128)(items)
    assert got["input_ids"].shape == got["attention_mask"].shape == (2, 64)
    assert got["attention_mask"].sum(1).tolist() == [3, 1] and got["labels"].tolist() == [1, 0]
    assert (got["input_ids"][0, 3:] == 1).all()
    lm = prepare.BucketedCollator(1, "causal-lm", False, 128)([{"input_ids": torch.tensor([5, 6, 7])}])
    assert lm["labels"][0, :3].tolist() == [5, 6, 7] and (lm["labels"][0, 3:] == IGNORE).all()
    assert lm["attention_mask"].sum().item() == 3


@pytest.mark.parametrize("packed", [True, False])
def test_bucketed_padding_keeps_the_loss(packed: bool) -> None:
    """A tiny Llama's loss (packed examples or padded rows, chat-masked labels) is the same on the
    bucketed batch as on the collator's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 64, "pad_token_id": 0})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.config.use_cache = False
    items = _packed_items()
    if not packed:
        items = [{k: v for k, v in it.items() if k != "position_ids"} for it in items]
    with torch.no_grad():
        want = model(**Collator(0, "causal-lm", packed)(items)).loss
        got = model(**prepare.BucketedCollator(0, "causal-lm", packed, 64)(items)).loss
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_compile_blocks_in_place_keeps_the_state_dict_names() -> None:
    """Checkpoints, resumes and the final model rely on unchanged names (no ``_orig_mod.``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 64})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = list(model.state_dict())
    assert strategy.compile_blocks(model) == 2  # nothing compiles until a block runs
    assert list(model.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
