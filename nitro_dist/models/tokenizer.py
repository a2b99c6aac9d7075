"""Offline CLIP tokenizer.

The real CLIP BPE merges (``bpe_simple_vocab_16e6.txt.gz``, MIT licence, (c) 2021 OpenAI, as
shipped by openai/CLIP and open_clip) live in ``assets/``. transformers' ``CLIPTokenizer`` takes a
vocab dict and a merges list; both are derived here exactly as openai/CLIP builds its encoder, so
token ids match the hub's ``openai/clip-vit-large-patch14`` tokenizer without any download.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import cast

from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # openai/CLIP keeps this many merges: vocab size 49408 in all


def _bytes_to_unicode() -> dict[int, str]:
    # Reversible byte -> printable-unicode map from openai/CLIP (avoids whitespace/control chars).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    # every merge line is one pair "a b"
    merges = cast(
        "tuple[tuple[str, str], ...]", tuple(tuple(m.split()) for m in lines[1 : NUM_MERGES + 1])
    )
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP BPE tokenizer built from the shipped merges (SDXL's encoder 2 pads with "!")."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
