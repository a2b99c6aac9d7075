"""Distil a multi-step teacher into a 1-4 step generator with NitroFusion, on Ray Train.

Examples:
  python -m nitro_dist.train                              # the built-in digits task (CPU, minutes)
  python -m nitro_dist.train --config tiny train.iterations=5 distributed.num_workers=2
  python -m nitro_dist.train --config configs/sdxl_realism.yaml --dry-run
  python -m nitro_dist.train pool.candidates=8 pool.refresh_rate=0.02 --run-dir runs/try1
  ray job submit --working-dir . -- python -m nitro_dist.train --config X.yaml key=value ...

Training always runs through Ray Train's TorchTrainer: on the cluster named by RAY_ADDRESS (set
under `ray job submit`), else on a local Ray started for the run. distributed.num_workers ranks
each hold a shard of the head pool and run G under DeepSpeed ZeRO (distributed.zero_stage).

The run directory <distributed.storage_path>/<run_name> (default runs/<run_name>; local or
s3://) gets config.yaml (the resolved config), metrics.jsonl, samples/*.png (grids at 1, 2 and
4 steps), iter_XXXXXX/ checkpoints and final_metrics.json. Rerunning the same command continues
from the latest checkpoint of that run; --resume PATH starts from a given checkpoint, on any
number of workers. distributed.max_failures=N lets Ray restart failed workers from the last
checkpoint (check it with distributed.fail_at_iteration=I, or NITRO_FAIL_AT=I[:rank]).
"""

from __future__ import annotations

import argparse
import json
import sys

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
        "--run-dir",
        default=None,
        help="output folder, short for distributed.storage_path=DIR/.. run_name=basename(DIR) "
        "(default: runs/<run_name>)",
    )
    ap.add_argument(
        "--resume",
        default=None,
        help="checkpoint (or run dir) to start from when the run has none of its own",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pool.candidates=8"
    )
    return ap.parse_intermixed_args(argv)  # key=value may come before or after options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.run_dir:
        run_dir = args.run_dir.rstrip("/")
        parent, _, name = run_dir.rpartition("/")
        overrides += [f"distributed.storage_path={parent or '.'}", f"run_name={name}"]
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from nitro_dist.distributed.address import check_ray_address

    try:
        check_ray_address()  # before the heavy imports: a wrong address fails at once
        from nitro_dist.distributed.ray_train import launch

        final = launch(cfg, args.resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Ray's TrainingFailedError wraps the worker's exception
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError"):
            raise
        print(f"error: training failed: {root_cause(e)}", file=sys.stderr)
        return 1
    print(json.dumps(final, indent=2))
    print(f"run directory: {final['run_dir']}")
    return 0


def root_cause(e: BaseException) -> str:
    """The innermost worker error, e.g. 'ValueError: data.shards: ...'."""
    seen = e
    for _ in range(10):
        inner = getattr(seen, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            seen = next(iter(inner.values()))
            continue
        if seen.__cause__ is not None:
            seen = seen.__cause__
            continue
        break
    return f"{type(seen).__name__}: {seen}"


if __name__ == "__main__":
    sys.exit(main())
