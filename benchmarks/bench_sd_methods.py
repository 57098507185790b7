"""Every method on Stable Diffusion: time per image relative to the base, NFE, peak memory.

For two UNet sizes (the tiny SD UNet and the one with 64-128 channels at a 32x32 latent of
``benchmarks/bench_lora.py``), a pipeline with K = 2 LoRA experts (rank 4 on the attention
projections) and a LoRA oracle, and two tiny differentiable rewards (mean brightness and
red minus green of the decoded image: they cost next to nothing, so the reward-reading
methods' cost here is the UNet and VAE work they add, not a reward model's), every method
samples the same prompts and seeds through :func:`msdda.methods.run_method` (the sweep's
path), in one run:

- ``s/img`` and ``x base``: the fastest of ``--repeats`` interleaved rounds (round-robin
  over the methods, so machine load hits them alike), per image, and its ratio to the base
  of the same round set;
- ``NFE``: network evaluations (UNet rows, one per image with guidance) per image;
- ``rew``: images through a reward per image;
- ``peak MiB``: :func:`msdda.measure.peak_memory` of the chain, largest over the rounds:
  on a GPU ``torch.cuda.max_memory_allocated``, on a CPU the process's peak resident
  memory (which includes everything the process holds: models, libraries); ``+MiB``: how
  far the peak rose above what was held when the chain started (the method's own share).

Method settings are :class:`msdda.methods.MethodSettings`' defaults (rgg scale 1,
code 4 candidates per 5-step block, target 8 candidates per step) unless given.

    nice -n 10 .venv/bin/python benchmarks/bench_sd_methods.py
    .venv/bin/python benchmarks/bench_sd_methods.py --sizes tiny --steps 4 --repeats 1
    .venv/bin/python benchmarks/bench_sd_methods.py --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from bench_lora import SIZES, TARGETS

from msdda.methods import METHODS, MethodRun, MethodSettings
from msdda.sd import MSDDAStableDiffusionPipeline
from msdda.sd.domain import SDProblem, run_sd_method, sd_method_context
from msdda.sd.testing import TinySDConfig, save_random_lora, tiny_sd_components

PROMPTS = ["a lighthouse at dusk", "a bowl of red apples"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))


def build_problem(cfg: TinySDConfig, steps: int, device: str, folder: Path) -> SDProblem:
    """The tiny pipeline of ``cfg`` with LoRA experts a, b and a LoRA oracle at (0.5, 0.5)."""
    comps = tiny_sd_components(cfg)
    pipe = MSDDAStableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    loras = {
        name: save_random_lora(
            comps["unet"],
            folder / f"{name}.safetensors",
            rank=4,
            alpha=4,
            target_modules=TARGETS["attn"],
            seed=seed,
        )
        for name, seed in (("a", 1), ("b", 2), ("oracle", 3))
    }
    pipe.load_experts(loras)
    pipe.to(device)
    size = cfg.sample_size * pipe.vae_scale_factor
    return sd_method_context(
        pipe,
        [brightness, redness],
        {(0.5, 0.5): "oracle"},
        num_inference_steps=steps,
        height=size,
        width=size,
    )


def measure(
    problem: SDProblem, seeds: list[int], settings: MethodSettings, repeats: int
) -> dict[str, list[MethodRun]]:
    """Every method's runs, ``repeats`` interleaved rounds after one warm-up round."""
    prompts = [p for p in PROMPTS for _ in seeds]
    per_sample = [s for _ in PROMPTS for s in seeds]
    runs: dict[str, list[MethodRun]] = {m: [] for m in METHODS}
    for r in range(repeats + 1):
        for m in METHODS:
            w = None if m == "base" else [0.5, 0.5]
            run = run_sd_method(problem, m, w, prompts, per_sample, settings=settings)
            if r > 0:
                runs[m].append(run)
    return runs


def table(runs: dict[str, list[MethodRun]]) -> list[str]:
    base = min(r.seconds_per_image for r in runs["base"])
    kind = runs["base"][0].peak_memory_kind
    lines = [
        f"  {'method':<8}{'s/img':>9}{'x base':>8}{'NFE':>7}{'rew':>6}{'peak MiB':>10}"
        f"{'+MiB':>8}   (peak: {kind})"
    ]
    for m, rs in runs.items():
        best = min(r.seconds_per_image for r in rs)
        peak = max(r.peak_memory_bytes for r in rs) / 2**20
        rise = max(r.peak_memory_increase or 0 for r in rs) / 2**20
        r0 = rs[0]
        lines.append(
            f"  {m:<8}{best:>9.4f}{best / base:>8.2f}{r0.nfe_per_image:>7.1f}"
            f"{r0.reward_rows / r0.images:>6.1f}{peak:>10.1f}{rise:>8.1f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,64-128", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per prompt (2 prompts)")
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rgg-scale", type=float, default=1.0)
    ap.add_argument("--code-candidates", type=int, default=4)
    ap.add_argument("--code-block", type=int, default=5)
    ap.add_argument("--target-candidates", type=int, default=8)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    settings = MethodSettings(
        rgg_scale=args.rgg_scale,
        code_candidates=args.code_candidates,
        code_block=args.code_block,
        target_candidates=args.target_candidates,
    )
    seeds = list(range(args.seeds))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"torch {torch.__version__} on {where}, {args.threads} thread(s); {args.steps} steps, "
        f"{len(PROMPTS) * len(seeds)} images per run with CFG (scale 7.5); K = 2 LoRA experts "
        f"(rank 4, attention); settings {settings.to_dict()}; fastest of {args.repeats} "
        "interleaved rounds"
    )
    for size in args.sizes.split(","):
        cfg = SIZES[size]
        with tempfile.TemporaryDirectory() as tmp:
            problem = build_problem(cfg, args.steps, args.device, Path(tmp))
            runs = measure(problem, seeds, settings, args.repeats)
        side = cfg.sample_size
        print(f"\n[{size}: channels {cfg.block_out_channels}, latent {side}x{side}]")
        print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
