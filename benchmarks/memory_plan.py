"""Memory plan before launch: per rank, what the student, teacher/backbone, text encoders, owned
heads and one micro-batch's activations take, and whether it fits a device
(nitro_dist/memory_plan.py says how each row is estimated). No device and no weights: models
are built from their configs (SDXL base 1.0's where a preset's model path is not here) on
meta/fake tensors.

  python benchmarks/memory_plan.py --config sdxl_realism [--workers 8] [--device-memory 80GiB]
      [--skip-activations] [key=value ...]

Exit status: 0 fits (or no --device-memory), 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from nitro_dist.config import load_config
from nitro_dist.memory_plan import GiB, parse_memory, plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="a preset name or a YAML file")
    ap.add_argument("--workers", type=int, help="ranks (sets distributed.num_workers)")
    ap.add_argument("--device-memory", help="per-device memory: 80, 80GiB, 141GB, 512MiB")
    ap.add_argument(
        "--skip-activations",
        action="store_true",
        help="no fake-tensor iteration (minutes at SDXL size): activations 0",
    )
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"distributed.num_workers={args.workers}")
    try:
        cfg = load_config(args.config, overrides)
        device = parse_memory(args.device_memory) if args.device_memory else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = plan(cfg, activations=not args.skip_activations)
    o = cfg.optim
    g_adam = f"{o.state_bits}-bit" + (" offloaded to CPU" if o.offload == "cpu" else "")
    ckpt = "on" if cfg.model.gradient_checkpointing else "off"
    print(f"{args.config}: {p.arch}; {p.world_size} rank(s), micro-batch {p.micro_batch} x "
          f"grad_accum {cfg.train.grad_accum}, ZeRO-{cfg.distributed.zero_stage}, precision "
          f"{cfg.train.precision}, G AdamW {g_adam}, heads' AdamW {cfg.pool.state_bits}-bit, "
          f"activation checkpointing {ckpt}")  # fmt: skip
    print(p.pool_line())
    print(p.table())
    if device is None:
        return 0
    need = max(p.total(r) for r in range(p.world_size))
    verdict = "fits" if p.fits(device) else "does NOT fit"
    print(f"{verdict}: {need / GiB:.2f} GiB needed of {device / GiB:.2f} GiB per device")
    return 0 if p.fits(device) else 1


if __name__ == "__main__":
    sys.exit(main())
