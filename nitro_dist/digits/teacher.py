"""Train the digits teacher: ``python -m nitro_dist.digits.teacher [--iterations N] [--out DIR]``.

A ~1M-parameter conditional UNet learns epsilon-prediction on SDXL's noise schedule with 10%
prompt dropout (so classifier-free guidance and the unconditional backbone pass have an empty
prompt to use). Its EMA weights, the frozen text encoder and the scheduler config are written as
a diffusers folder, which is what ships in ``nitro_dist/digits/weights``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import cast

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from nitro_dist.digits.data import PROMPTS, digits_dataset
from nitro_dist.digits.task import WEIGHTS_DIR
from nitro_dist.models import tiny
from nitro_dist.models.builders import freeze
from nitro_dist.models.text import TextConditioner
from nitro_dist.models.tokenizer import clip_tokenizer


def build_text_encoder(seed: int) -> TextConditioner:
    torch.manual_seed(seed)
    enc = CLIPTextModel(CLIPTextConfig(**tiny.DIGITS_TEXT_ENCODER))
    return TextConditioner([clip_tokenizer(tiny.DIGITS_MAX_TOKENS)], [freeze(enc)], sdxl=False)


def train_teacher(
    out: Path, *, iterations: int, batch_size: int, lr: float, seed: int, p_uncond: float = 0.1
) -> dict:
    torch.manual_seed(seed)
    text = build_text_encoder(seed)
    # Conditioning for the ten prompts and the empty prompt, computed once: the encoder is frozen.
    table = text.encode([*PROMPTS, ""]).hidden_BLD  # (11, L, D); row 10 = empty prompt
    images, labels = digits_dataset(8)
    unet = UNet2DConditionModel(**tiny.DIGITS_UNET)
    ema = UNet2DConditionModel(**tiny.DIGITS_UNET)
    ema.load_state_dict(unet.state_dict())
    freeze(ema)
    sched = DDPMScheduler.from_config(tiny.SDXL_SCHEDULE)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, iterations // 10 + 1)

    def lr_at(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iterations - warmup)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    bar = tqdm(range(iterations), desc="digits teacher", unit="it")
    for i in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < p_uncond] = 10
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=table[y]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if i % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    encoder = cast(CLIPTextModel, text.encoders[0])  # the one build_text_encoder made
    encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    info = {
        "iterations": iterations,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "p_uncond": p_uncond,
        "final_loss": sum(losses[-200:]) / len(losses[-200:]),
        "train_seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in ema.parameters()),
    }
    (out / "teacher.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output diffusers folder")
    args = ap.parse_args(argv)
    info = train_teacher(
        args.out, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
