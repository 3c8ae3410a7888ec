"""A bare torch DDP training loop: the baseline bench/trainer.py compares tauon's trainer against.

    torchrun --nproc-per-node 2 bench/bare_ddp.py --data D --model M --steps N --batch B --max-len L

Same work as tauon's trainer for sequence classification: the same model, tokenizer, seeded split,
dynamic padding, DistributedSampler order and AdamW + linear schedule; no eval, checkpoints, metrics,
progress or per-step all-reduce of statistics. Gradients are clipped to ``--clip`` (tauon's trainer
clips to 1.0: equal work). Prints one JSON line on rank 0 (with each step's loss on rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--validation-split", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    a = ap.parse_args()

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        tdist.init_process_group("gloo")

    rows = [json.loads(x) for x in open(a.data, encoding="utf-8") if x.strip()]
    order = list(range(len(rows)))
    random.Random(a.seed).shuffle(order)
    n_val = int(len(rows) * a.validation_split)
    train = [rows[i] for i in sorted(order[n_val:])]
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok([r["text"] for r in train], truncation=True, max_length=a.max_len)["input_ids"]
    labels = [int(r["label"]) for r in train]

    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=2)
    model.train()
    ddp = DDP(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (a.steps - s) / a.steps))
    sampler: torch.utils.data.distributed.DistributedSampler[int] = (
        torch.utils.data.distributed.DistributedSampler(
            list(range(len(ids))),  # type: ignore[arg-type]  # any sized sequence works
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=a.seed,
        )
    )

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        longest = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), longest), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros_like(x)
        for j, i in enumerate(idx):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
            m[j, : len(ids[i])] = 1
        return {"input_ids": x, "attention_mask": m, "labels": torch.tensor([labels[i] for i in idx])}

    step, epoch, samples = 0, 0, 0
    step_times: list[float] = []
    losses: list[float] = []
    t0 = time.monotonic()
    while step < a.steps:
        sampler.set_epoch(epoch)
        idx = list(sampler)
        for b in range(0, len(idx), a.batch):
            if step >= a.steps:
                break
            t_step = time.monotonic()
            batch = collate(idx[b : b + a.batch])
            loss = ddp(**batch).loss
            loss.backward()
            if a.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            samples += len(batch["labels"]) * world
            step += 1
            step_times.append(time.monotonic() - t_step)
            losses.append(float(loss))
        epoch += 1
    seconds = time.monotonic() - t0
    if rank == 0:
        median = sorted(step_times)[len(step_times) // 2]
        res = {
            "steps": step,
            "samples": samples,
            "seconds": seconds,
            "samplesPerSecond": samples / seconds,
            "stepSecondsMedian": median,
            "loss": float(loss),
            "losses": losses,
        }
        print("BARE_RESULT " + json.dumps(res), flush=True)
    if world > 1:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
