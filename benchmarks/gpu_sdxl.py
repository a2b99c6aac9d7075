"""GPU benchmark at SDXL scale on one card (benchmarks/gpu_sdxl.sh runs it): training iterations.

SDXL-architecture student + teacher (2.6B-parameter UNets) and both text encoders with random
weights from the configs in nitro_dist/models/tiny.py (no download). Each phase is its own process
under gpu_sdxl.sh (one running out of memory leaves the others' numbers), appends a JSON line per
measurement to OUT/results.jsonl and prints it:

  train   NitroFusion iterations: the sdxl_realism preset (offline teacher, 120-head pool on this
          rank, activation checkpointing), bf16, DeepSpeed ZeRO-2 on a one-rank NCCL group:
          "base" (config defaults) or "opt" (the performance keys on) at a fixed batch, then with
          --then-batch auto the largest batch that fits memory and time. Per measurement: ms per
          iteration, images/s, peak memory, MFU/HFU, where an iteration goes (phase timer).
  flops   (CPU, meta tensors) the iteration's FLOPs per sample with and without checkpointing's
          recomputation, for MFU (the train phase uses them when they are there, else the report)
  gpu_sdxl_gen.py: components and generation latency; gpu_sdxl_report.py: the tables.

  python benchmarks/gpu_sdxl.py {train|flops} --out DIR [--smoke] [--budget S] ...
--smoke runs the tiny SDXL look-alike on the CPU (tests/test_perf_options.py runs all phases).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from nitro_dist import perf
from nitro_dist.build import build_run
from nitro_dist.config import load_config
from nitro_dist.distributed.parallel import init_process_group, parallelize
from nitro_dist.models import tiny
from nitro_dist.models.builders import build_sdxl_from_configs
from nitro_dist.models.text import Cond
from nitro_dist.step import train_step
from nitro_dist.timing import PhaseTimer

SETTINGS = {  # "base": the config defaults; "opt": the performance keys on
    "base": {"optim.fused": False, "pool.fused": False, "train.channels_last": False},
    "opt": {"optim.fused": True, "pool.fused": True, "train.channels_last": "measured"},
    # "opt" plus torch.compile of the student (inductor); warm up >= 3: compile + recompile
    "compiled": {
        "optim.fused": True,
        "pool.fused": True,
        "train.channels_last": "measured",
        "train.compile": True,
    },
}


class Phase:
    """Where results go, the device, and the time left of this phase's budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.time()
        self.dev = torch.device("cpu" if args.smoke or args.cmd == "flops" else "cuda")
        self.name = perf.device_name(self.dev)
        self.results = args.out / "results.jsonl"
        self.references: dict[str, torch.Tensor] = {}  # generation: each variant's first image

    @classmethod
    def start(cls, args: argparse.Namespace) -> Phase:
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.smoke and args.cmd != "flops":
            if not torch.cuda.is_available():
                raise SystemExit(f"{args.cmd} needs a CUDA device (or --smoke)")
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(args)

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def emit(self, kind: str, **rec) -> dict:
        rec = {"phase": kind, "tag": self.args.tag, "device": self.name, **rec}
        rec["torch"] = torch.__version__
        line = json.dumps(rec)
        print(f"RESULT {line}", flush=True)
        with self.results.open("a") as f:
            f.write(line + "\n")
        return rec

    def records(self, kind: str) -> list[dict]:
        if not self.results.exists():
            return []
        rows = [json.loads(line) for line in self.results.read_text().splitlines() if line]
        return [r for r in rows if r.get("phase") == kind]

    def configs(self):
        if self.args.smoke:
            return tiny.TINY_SDXL_UNET, tiny.TINY_SDXL_TEXT_ENCODERS, tiny.TINY_VAE
        return tiny.SDXL_UNET, tiny.SDXL_TEXT_ENCODERS, tiny.SDXL_VAE


def guarded(ph: Phase, what: str, fn, *a, **kw):
    """Run one measurement; an error (out of memory, say) is printed and recorded, not fatal."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # a benchmark reports every failure and goes on with the next
        traceback.print_exc()
        ph.emit("error", what=what, error=f"{type(e).__name__}: {e}"[:500])
        gc.collect()
        if ph.dev.type == "cuda":
            torch.cuda.empty_cache()
        return None


def median_ms(fn, dev: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = perf.now(dev)
        fn()
        times.append(perf.now(dev) - t0)
    return 1000 * statistics.median(times)


# ---------------------------------------------------------------------------------------------
# train: NitroFusion iterations under DeepSpeed ZeRO-2


def settings_for(ph: Phase) -> dict:
    out = dict(SETTINGS[ph.args.settings])
    if out["train.channels_last"] == "measured":  # on only where the gen phase measured a gain
        comp: dict = {}
        for rec in ph.records("components"):
            comp.update(rec)
        nchw, cl = comp.get("unet_fwd_bwd_nchw_ms"), comp.get("unet_fwd_bwd_channels_last_ms")
        out["train.channels_last"] = bool(nchw and cl and cl < 0.97 * nchw)
    return out


def overrides(ph: Phase, settings: dict, batch: int) -> list[str]:
    cuda = ph.dev.type == "cuda"
    return [
        "task=digits",  # its built-in prompts stand in for captions: the latents' size counts
        "data.source=task",
        "teacher.mode=offline",  # as the preset: teacher pairs precomputed (here 16 of them)
        "teacher.offline_pairs=16",
        "teacher.batch_size=8",
        f"train.device={ph.dev.type}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
        f"train.batch_size={batch}",
        "train.grad_accum=1",
        "distributed.num_workers=1",
        "distributed.zero_stage=2",
        "pool.candidates=1",  # 120 heads: about what one rank of an 8-GPU run of 480 holds
        "model.gradient_checkpointing=true",
        "logging.wandb=false",
        *(f"{k}={str(v).lower()}" for k, v in settings.items()),
    ]


def train(ph: Phase) -> None:
    args, dev = ph.args, ph.dev
    init_process_group(dev)
    unet_cfg, text_cfgs, _ = ph.configs()
    with torch.device(dev):
        models = build_sdxl_from_configs(unet_cfg, text_cfgs, None)
    side = args.resolution // 8
    models.sample_shape = (4, side, side)
    models.student.enable_gradient_checkpointing()
    settings = settings_for(ph)
    cfg = load_config("sdxl_realism", overrides(ph, settings, args.batch))
    run = build_run(cfg, models=models, progress=False)
    parallelize(run, 0, 1)
    print(f"{ph.name}: built, pairs, DeepSpeed in {time.time() - ph.t0:.1f}s", flush=True)
    it, warm = 0, []
    for _ in range(args.warmup):
        warm.append(timed_step(run, it))
        it += 1
    common = {"resolution": args.resolution, "settings": settings}
    t_it = min(warm[1:] or warm)
    ph.emit("warmup", **common, batch=args.batch, iteration_ms=[1000 * t for t in warm])
    if not args.skip_first:  # half the time left when a second batch follows
        share = 0.5 if args.then_batch == "auto" else 1.0
        reserve = 10 + 4 * t_it if args.profile else 0.0
        iters = fitting_iters(ph.left() * share - 5 - reserve, t_it, args.iters)
        rec = guarded(ph, "train", measure, ph, run, it, iters, common)
        it = rec["next_iteration"] if rec else it + iters + 3
        if args.profile and ph.left() > 5 + 3 * t_it:
            guarded(ph, "profile", profile, ph, run, it)
            it += 1
    if args.then_batch != "auto":
        return
    if ph.left() < 15 + 12 * t_it:  # no room for a larger batch to show anything
        ph.emit("skipped", what="the larger batch", left_s=round(ph.left()))
        return
    b0 = run.cfg.train.batch_size
    batch = guarded(ph, "batch choice", choose_batch, ph, run, it, b0, t_it) or b0
    it += 1
    run.cfg.train.batch_size = batch  # DeepSpeed does not look at the batch after initialize()
    t_b = guarded(ph, f"warm-up at batch {batch}", timed_step, run, it)
    it += 1
    if t_b is None and batch != b0:  # out of memory after all: back to the batch that ran
        run.cfg.train.batch_size = batch = b0
        t_b = guarded(ph, f"warm-up at batch {b0}", timed_step, run, it)
        it += 1
    if t_b is not None:
        iters = fitting_iters(ph.left() - 5, t_b, args.iters)
        guarded(ph, f"train at batch {batch}", measure, ph, run, it, iters, common)


def timed_step(run, it: int) -> float:
    t0 = perf.now(run.device)
    train_step(run, it)
    return perf.now(run.device) - t0


def fitting_iters(seconds: float, t_it: float, most: int) -> int:
    """Timed iterations that fit ``seconds`` with the 2 breakdown ones after them."""
    return max(min(3, most), min(most, int(seconds / max(t_it, 1e-3) - 2.5)))


def choose_batch(ph: Phase, run, it: int, b0: int, t_it: float) -> int:
    """The largest batch whose activations fit (one iteration's per-phase memory peaks, scaled
    per sample) and whose iterations fit the time left, at most --max-batch."""
    if ph.dev.type != "cuda":
        return min(ph.args.max_batch, 2 * b0)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    timer = PhaseTimer(sync_cuda=True, track_memory=True)
    train_step(run, it, timer)
    act = max(v for k, v in timer.peak_bytes.items() if k != "g_optimizer") - start
    total = torch.cuda.get_device_properties(ph.dev).total_memory
    fit_mem = int(b0 * (0.90 * total - start) / max(act, 1))
    fit_time = int(b0 * (ph.left() - 20) / (10 * t_it))  # >= 6 timed if time grew linearly
    batch = max(1, min(ph.args.max_batch, fit_mem, fit_time))
    ph.emit(
        "batch_choice",
        tag=ph.args.tag,
        from_batch=b0,
        start_gib=start / 2**30,
        activations_gib=act / 2**30,
        optimizer_peak_gib=timer.peak_bytes.get("g_optimizer", 0) / 2**30,
        total_gib=total / 2**30,
        fit_memory=fit_mem,
        fit_time=fit_time,
        chosen=batch,
    )
    return batch


def measure(ph: Phase, run, it: int, iters: int, common: dict) -> dict:
    found = [r for r in ph.records("flops") if r["resolution"] == ph.args.resolution]
    flops = perf.IterationFlops.from_record(found[-1]) if found else None
    # no flops yet: the report adds MFU
    m = perf.measure_training(run, it, iters, breakdown_iters=ph.args.breakdown_iters, flops=flops)
    mfu, hfu = m.utilisation(perf.peak_flops(ph.name))
    return ph.emit(
        "train",
        **common,
        batch=m.batch,
        iters=len(m.seconds),
        iteration_ms_median=1000 * statistics.median(m.seconds),
        iteration_ms_mean=1000 * sum(m.seconds) / len(m.seconds),
        images_per_s=m.images_per_s,
        peak_mem_gib=m.peak_mem_gib,
        hardware_tflop_per_iteration=None if m.hardware_flops is None else m.hardware_flops / 1e12,
        model_tflop_per_iteration=None if m.model_flops is None else m.model_flops / 1e12,
        mfu=mfu,
        hfu=hfu,
        mean_backsim=m.mean_backsim,
        peak_flops=perf.peak_flops(ph.name),
        breakdown_ms={k: 1000 * v for k, v in m.breakdown_s.items()},
        next_iteration=m.next_iteration,
    )


def profile(ph: Phase, run, it: int) -> None:
    """One iteration under torch.profiler: the top kernels and CPU ops (OUT/profile_TAG.txt)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ph.dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        train_step(run, it)
        perf.now(ph.dev)
    table = prof.key_averages()
    key = "self_device_time_total" if ph.dev.type == "cuda" else "self_cpu_time_total"
    text = table.table(sort_by=key, row_limit=30, max_name_column_width=70)
    text += "\n" + table.table(sort_by="self_cpu_time_total", row_limit=15)
    (ph.args.out / f"profile_{ph.args.tag}.txt").write_text(text)
    print(text[:6000], flush=True)


# ---------------------------------------------------------------------------------------------
# flops: checkpointing's recomputation per sample (meta tensors, CPU)


def flops(ph: Phase) -> None:
    """The training iteration's FLOPs per sample at each resolution, counted on meta tensors
    (perf.meta_iteration_flops) with the train phase's config: the GPU is left to training."""
    unet_cfg = ph.configs()[0]
    d = unet_cfg["cross_attention_dim"]
    pooled = (
        unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
    )
    cond = Cond(torch.zeros(1, 77, d), torch.zeros(1, pooled), torch.zeros(1, 6))
    cfg = load_config("sdxl_realism", overrides(ph, SETTINGS["base"], 1))
    for res in ph.args.resolutions:
        t0 = time.time()
        fl = perf.meta_iteration_flops(
            cfg, unet_cfg, unet_cfg, (4, res // 8, res // 8), cond, tiny.SDXL_SCHEDULE
        )
        ph.emit("flops", resolution=res, **dataclasses.asdict(fl), s=time.time() - t0)


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny SDXL look-alike on the CPU")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds this phase may take")
    ap.add_argument("--tag", default="run", help="names this phase's rows in the report")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__)
    ap.add_argument("cmd", choices=["train", "flops"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--then-batch", choices=["none", "auto"], default="none")
    ap.add_argument("--skip-first", action="store_true", help="time the chosen batch only")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--settings", choices=sorted(SETTINGS), default="base")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--breakdown-iters", type=int, default=2, help="under the phase timer")
    ap.add_argument("--profile", action="store_true", help="OUT/profile_TAG.txt: top kernels")
    args = ap.parse_args(argv)
    ph = Phase.start(args)
    {"train": train, "flops": flops}[args.cmd](ph)
    print(f"{args.cmd} done in {time.time() - ph.t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
