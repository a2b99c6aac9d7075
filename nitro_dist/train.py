"""Distil a multi-step teacher into a 1-4 step generator with NitroFusion.

Examples:
  python -m nitro_dist.train                              # the built-in digits task (CPU, minutes)
  python -m nitro_dist.train --config tiny train.iterations=5
  python -m nitro_dist.train --config configs/sdxl_realism.yaml --dry-run
  python -m nitro_dist.train pool.candidates=8 pool.refresh_rate=0.02 --run-dir runs/try1

The run directory gets config.yaml (the resolved config), metrics.jsonl, samples/*.png (grids at
1, 2 and 4 steps), checkpoints/ (with a ``latest`` pointer) and final_metrics.json. Rerunning
the same command resumes from the latest checkpoint of that run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nitro_dist.config import dump_yaml, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config",
        default="digits",
        help="preset name in configs/ or a YAML path (default: digits)",
    )
    ap.add_argument(
        "--run-dir", type=Path, default=None, help="output folder (default: runs/<run_name>)"
    )
    ap.add_argument(
        "--resume", type=Path, default=None, help="checkpoint (or run dir) to start from"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pool.candidates=8"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from nitro_dist import checkpoint
    from nitro_dist.loop import train

    run_dir = args.run_dir or Path("runs") / cfg.run_name
    try:
        resume = checkpoint.resolve(args.resume) if args.resume else None
        final = train(cfg, run_dir, resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(final, indent=2))
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
