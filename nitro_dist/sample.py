"""Generate images from a trained checkpoint: one PNG per image.

  python -m nitro_dist.sample --checkpoint runs/digits --prompt "a handwritten digit seven" \
      --steps 1 --num-images 8 --seed 0 --out samples/

--checkpoint takes a checkpoint folder, a run's checkpoints/ folder or a run folder (latest
checkpoint). Image i uses seed S+i: the same seed gives the same pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nitro_dist.images import to_pil, to_uint8_hwc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--steps", type=int, default=1, choices=[1, 2, 3, 4])
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scale", type=int, default=0, help="nearest upscale factor (0 = to >= 64 px)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not args.prompt.strip():
        ap.error("--prompt must not be empty")
    if not 1 <= args.num_images <= 1024:
        ap.error("--num-images must be in 1..1024")
    from nitro_dist.inference import Generator

    try:
        gen = Generator.from_checkpoint(args.checkpoint, device=args.device)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = [args.seed + i for i in range(args.num_images)]
    images = gen([args.prompt] * args.num_images, seeds, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    arr = to_uint8_hwc(images)
    scale = args.scale or max(1, -(-64 // arr.shape[1]))
    for seed, img in zip(seeds, arr, strict=True):
        path = args.out / f"seed{seed:06d}_{args.steps}step.png"
        to_pil(img, scale).save(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
