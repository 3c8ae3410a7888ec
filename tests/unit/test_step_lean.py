"""The lean parts of the training step: no attention mask on unpadded causal batches (attention keeps its
causal fast path, the loss is unchanged), the mask back when the bucketed collator pads, and the fused
AdamW kernel only where every parameter is on a CUDA device."""

from __future__ import annotations

import torch
from torch import nn

from tauon_train import prepare
from tauon_train.data import IGNORE, Collator
from tests.manifests import TINY_LLAMA


def _items(*lengths: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.arange(2, 2 + n)} for n in lengths]


def test_unpadded_causal_batch_has_no_mask_and_a_padded_one_has() -> None:
    same = Collator(0, "causal-lm")(_items(5, 5))
    assert set(same) == {"input_ids", "labels"}
    ragged = Collator(0, "causal-lm")(_items(5, 3))
    assert ragged["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert (ragged["labels"][1, 3:] == IGNORE).all()
    # classification keeps its mask (the pooler reads it)
    cls = Collator(0, "sequence-classification")([{**it, "label": 1} for it in _items(4, 4)])
    assert cls["attention_mask"].tolist() == [[1] * 4] * 2


def test_bucketed_collator_adds_the_mask_when_it_pads_an_unpadded_batch() -> None:
    got = prepare.BucketedCollator(0, "causal-lm", False, 128)(_items(5, 5))
    assert got["input_ids"].shape == got["attention_mask"].shape == (2, 64)
    assert got["attention_mask"].sum(1).tolist() == [5, 5]
    assert (got["labels"][:, 5:] == IGNORE).all()
    full = prepare.BucketedCollator(0, "causal-lm", False, 64)(_items(64, 64))
    assert set(full) == {"input_ids", "labels"}  # already a bucket length: nothing padded, no mask


def test_loss_without_the_all_ones_mask_is_the_same() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 64})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    batch = Collator(0, "causal-lm")(_items(12, 12, 12))
    with torch.no_grad():
        lean = model(**batch).loss
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss
    assert torch.allclose(lean, masked, atol=1e-6), (lean, masked)


def test_fused_adamw_only_on_cuda() -> None:
    model = nn.Linear(4, 4)
    assert not prepare.fused_adamw(list(model.parameters()))
    assert not prepare.fused_adamw([])
    opt = prepare.make_optimizer(model, 1e-3, 0.01)
    assert not opt.defaults.get("fused")
    meta = nn.Linear(4, 4, device="meta")
    assert not prepare.fused_adamw(list(meta.parameters()))
