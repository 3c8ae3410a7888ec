"""Train the small byte-level BPE tokenizer shipped in examples/tokenizers/tiny-llama.

    python examples/data/make_tokenizer.py            # rewrites examples/tokenizers/tiny-llama

Trained with the ``tokenizers`` library on examples/data/corpus.jsonl (field ``text``), vocabulary 2048,
special tokens ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``, and a simple chat template
(``<|role|>\\ncontent</s>`` per message), so ``AutoTokenizer.from_pretrained`` loads it with no
network and ``apply_chat_template`` works. Deterministic for a given corpus.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.jsonl"
OUT = HERE.parent / "tokenizers" / "tiny-llama"
VOCAB = 2048
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def texts(path: Path) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("text"), str):
                    raise SystemExit(f"{path}:{n}: field 'text' must be a string")
                out.append(row["text"])
    return out


def build(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(corpus), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out, exist_ok=True)
    fast.save_pretrained(str(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--vocab", type=int, default=VOCAB)
    a = p.parse_args()
    build(a.corpus, a.out, a.vocab)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
