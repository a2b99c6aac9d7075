"""Tables from benchmarks/gpu_sdxl.py's OUT/results.jsonl: training (baseline vs optimised, batch),
components, generation latency, against the targets (MFU >= 35%, 1-step 1024² <= 150 ms).

  python benchmarks/gpu_sdxl_report.py --out DIR     # prints and writes DIR/gpu_sdxl.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nitro_dist.perf import IterationFlops

TARGET_MFU, TARGET_1STEP_MS = 0.35, 150.0


def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def with_mfu(train: list[dict], flops: list[dict]) -> None:
    """FLOPs, MFU and HFU for train rows measured before the flops phase had finished: an
    iteration costs batch * per_sample + per_backsim * (its backward-simulation forwards)."""
    found = {r["resolution"]: r for r in flops}
    for r in train:
        f = found.get(r["resolution"])
        if r.get("hardware_tflop_per_iteration") is not None or f is None:
            continue
        fl, n = IterationFlops.from_record(f), r.get("mean_backsim", 0.0)
        hw, model = fl.hardware(r["batch"], n), fl.model(r["batch"], n)
        r["hardware_tflop_per_iteration"], r["model_tflop_per_iteration"] = hw / 1e12, model / 1e12
        if r.get("peak_flops"):
            per_s = 1000 / r["iteration_ms_mean"] / r["peak_flops"]
            r["mfu"], r["hfu"] = model * per_s, hw * per_s


def settings_name(s: dict) -> str:
    on = [
        k.split(".")[-1] + ("" if k.startswith("train") else f"({k.split('.')[0]})")
        for k, v in s.items()
        if v
    ]
    return ", ".join(on) or "defaults"


def report(rows: list[dict]) -> str:
    by = lambda kind: [r for r in rows if r.get("phase") == kind]  # noqa: E731
    train, gens, comps = by("train"), by("generation"), by("components")
    with_mfu(train, by("flops"))
    device = next((r["device"] for r in rows if r.get("device", "CPU") != "CPU"), "CPU")
    torch_v = next((r["torch"] for r in rows), "?")
    out = [f"# NitroFusion at SDXL scale on {device} (torch {torch_v})", ""]
    out += [
        "## Training iteration (DeepSpeed ZeRO-2, one rank, bf16, offline teacher, 120 heads)",
        "",
        "MFU = model FLOPs (checkpointing's recomputation excluded) per second / dense bf16 peak; "
        "HFU counts the recomputation.",
        "",
        "| config | res | batch | settings on | iters | ms/it (median) | images/s | peak GiB | "
        "model TFLOP/it | MFU | HFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in train:
        out.append(
            f"| {r['tag']} | {r['resolution']} | {r['batch']} | {settings_name(r['settings'])} | "
            f"{r['iters']} | {r['iteration_ms_median']:.0f} | {r['images_per_s']:.2f} | "
            f"{r['peak_mem_gib']:.1f} | {fmt(r.get('model_tflop_per_iteration'))} | "
            f"{pct(r.get('mfu'))} | {pct(r.get('hfu'))} |"
        )
    base = next((r for r in train if r["tag"] == "512_base"), None)
    if base:
        out += ["", "Against the 512² baseline (512_base):", ""]
        for r in train:
            if r is base:
                continue
            same = r["resolution"] == base["resolution"] and r["batch"] == base["batch"]
            out.append(
                f"- {r['tag']} batch {r['batch']}: images/s "
                f"{ratio(r['images_per_s'], base['images_per_s'])}, MFU "
                f"{ratio(r.get('mfu'), base.get('mfu'))}, peak memory "
                f"{ratio(r['peak_mem_gib'], base['peak_mem_gib'])}"
                + (" (same size and batch: the settings alone)" if same else "")
            )
    for r in by("batch_choice"):
        out.append(
            f"- {r['tag']}: batch {r['chosen']} chosen from batch {r['from_batch']}: "
            f"{r['start_gib']:.1f} GiB resident + {r['activations_gib']:.1f} GiB activations "
            f"(optimizer step peak {r['optimizer_peak_gib']:.1f} of {r['total_gib']:.0f} GiB); "
            f"memory allows {r['fit_memory']}, time allows {r['fit_time']}"
        )
    if train:
        phases = sorted(
            {p for r in train for p in r["breakdown_ms"]},
            key=lambda p: -max(r["breakdown_ms"].get(p, 0) for r in train),
        )
        out += [
            "",
            "Where an iteration goes (ms, synchronised phase timer):",
            "",
            "| phase | " + " | ".join(f"{r['tag']} b{r['batch']}" for r in train) + " |",
            "|---|" + "---|" * len(train),
        ]
        for p in phases:
            out.append(
                f"| {p} | " + " | ".join(fmt(r["breakdown_ms"].get(p), ".0f") for r in train) + " |"
            )
    if comps:
        c: dict = {}
        for r in comps:
            c.update(r)
        out += ["", "## Components", ""]
        if "unet_fwd_bwd_nchw_ms" in c:
            out.append(
                f"- UNet forward+backward ({c['side_px']}², batch {c['batch']}, autocast, "
                f"checkpointing): NCHW {c['unet_fwd_bwd_nchw_ms']:.0f} ms, channels-last "
                f"{c['unet_fwd_bwd_channels_last_ms']:.0f} ms "
                f"({ratio(c['unet_fwd_bwd_nchw_ms'], c['unet_fwd_bwd_channels_last_ms'])} speed-up)"
            )
        if "adamw_fused_ms" in c:
            out.append(
                f"- AdamW step on {c['numel'] / 1e9:.2f}B fp32 parameters: foreach "
                f"{c['adamw_foreach_ms']:.1f} ms (+{fmt(c.get('adamw_foreach_extra_gib'))} GiB), "
                f"fused {c['adamw_fused_ms']:.1f} ms (+{fmt(c.get('adamw_fused_extra_gib'))} GiB): "
                f"{ratio(c['adamw_foreach_ms'], c['adamw_fused_ms'])} speed-up"
            )
    if gens:
        ref = next((g for g in gens if g["variant"] == "eager_autocast"), None)
        out += [
            "",
            f"## Generation {gens[0]['side_px']}² end to end (batch 1)",
            "",
            "| variant (phase) | 1 step ms | text / UNet / VAE ms | 4 steps ms | "
            "speed-up 1 / 4 vs eager_autocast | rel. err vs |",
            "|---|---|---|---|---|---|",
        ]
        for g in gens:
            s = g["one_step_split"]
            out.append(
                f"| {g['variant']} ({g.get('tag', '-')}) | {g['one_step_ms']:.0f} | "
                f"{s['text_ms']:.0f} / {s['unet_ms']:.0f} / {s['vae_ms']:.0f} | "
                f"{g['four_step_ms']:.0f} | {ratio(ref and ref['one_step_ms'], g['one_step_ms'])}"
                f" / {ratio(ref and ref['four_step_ms'], g['four_step_ms'])} | "
                f"{fmt(g.get('rel_err'), '.1e')} {g.get('rel_err_vs', '')} |"
            )
    best_mfu = max((r["mfu"] for r in train if r.get("mfu")), default=None)
    best_gen = min((g["one_step_ms"] for g in gens), default=None)
    out += [
        "",
        "## Targets",
        "",
        f"- MFU >= {TARGET_MFU:.0%}: best {pct(best_mfu)}",
        f"- 1-step 1024² <= {TARGET_1STEP_MS:.0f} ms: best {fmt(best_gen, '.0f')} ms",
    ]
    for r in by("warmup"):
        ms = ", ".join(f"{t:.0f}" for t in r["iteration_ms"])
        out.append(f"- {r['tag']} warm-up iterations at batch {r['batch']}: {ms} ms")
    for r in by("error"):
        out.append(f"- error in {r['tag']}: {r.get('what')}: {r.get('error')}")
    for r in by("skipped"):
        out.append(f"- skipped in {r['tag']}: {r.get('what')} ({r.get('left_s')} s left)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    path = args.out / "results.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []
    text = report(rows)
    (args.out / "gpu_sdxl.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
