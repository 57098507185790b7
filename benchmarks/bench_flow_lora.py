"""Cost of a K-LoRA-expert MSDDA step on SD3 transformers, against the base step.

For two SD3Transformer2DModel sizes (the tiny test model, and a larger one: 6 joint blocks,
4 heads of 32 channels, 32x32 latents) and K = 2 and 3 LoRA experts on Flow-GRPO's layers
(rank 8: attention q/k/v/out and the text-stream projections), it times one sampling step
through ``MSDDAStableDiffusion3Pipeline`` with classifier-free guidance (2 rows per model)
and Flow-GRPO's SDE (noise level 0.7):

- ``base``: the base transformer alone (weights all 0: the reference), the unit of the ratios;
- ``batched``: the K experts in one forward of the base (LoRABank, batch 2K), K step
  Gaussians and their fusion;
- ``sequential``: the same step with one base forward per expert (batch 2 each).

Steps are timed from the pipeline's callback, the variants interleaved round after round,
and the fastest step of each is reported, so that load from other processes disturbs every
variant alike and the figures least. All ratios come from one run.

    nice -n 10 .venv/bin/python benchmarks/bench_flow_lora.py
    nice -n 10 .venv/bin/python benchmarks/bench_flow_lora.py --sizes tiny --ks 2 --rounds 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from msdda.sd.flow_pipeline import MSDDAStableDiffusion3Pipeline
from msdda.sd.flow_testing import TinySD3Config, save_flow_lora, tiny_sd3_components

SIZES = {
    "tiny": TinySD3Config(),
    "larger": replace(
        TinySD3Config(),
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        sample_size=32,
    ),
}


def _prompt(cfg: TinySD3Config) -> dict:
    g = torch.Generator().manual_seed(0)
    d, p = cfg.joint_attention_dim, cfg.pooled_projection_dim
    return dict(
        prompt_embeds=torch.randn(1, 16, d, generator=g),
        negative_prompt_embeds=torch.randn(1, 16, d, generator=g),
        pooled_prompt_embeds=torch.randn(1, p, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, p, generator=g),
    )


def step_costs(cfg: TinySD3Config, k: int, rank: int, steps: int, rounds: int) -> dict[str, float]:
    """Fastest seconds per step of each variant (base, batched, sequential)."""
    pipe = MSDDAStableDiffusion3Pipeline(**tiny_sd3_components(cfg))
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        experts = {
            f"e{i}": save_flow_lora(pipe.transformer, Path(tmp) / f"e{i}", rank=rank, seed=i)
            for i in range(k)
        }
        pipe.load_experts(experts)
    size = cfg.sample_size * pipe.vae_scale_factor
    prompt = _prompt(cfg)

    def per_step(weights, mode: str) -> list[float]:
        pipe.lora_mode = mode
        stamps: list[float] = []
        pipe(
            weights=weights,
            **prompt,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=4.5,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            callback=lambda i, t, x: stamps.append(time.perf_counter()),
        )
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    uniform = {n: 1.0 / k for n in experts}
    variants = {
        "base": lambda: per_step({}, "batched"),
        "batched": lambda: per_step(uniform, "batched"),
        "sequential": lambda: per_step(uniform, "sequential"),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, fn in variants.items():
            times[v] += fn()
    return {v: min(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,larger", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--ks", default="2,3", help="numbers of LoRA experts")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="sampling steps per timed call")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), rank {args.rank}, CFG on")
    print(f"{'size':8} {'K':>2} {'base ms':>9} {'batched ms':>11} {'seq ms':>8} "
          f"{'batched/base':>13} {'seq/base':>9} {'seq/batched':>12}")  # fmt: skip
    for size in args.sizes.split(","):
        for k in (int(x) for x in args.ks.split(",")):
            c = step_costs(SIZES[size], k, args.rank, args.steps, args.rounds)
            print(
                f"{size:8} {k:>2} {1e3 * c['base']:9.2f} {1e3 * c['batched']:11.2f} "
                f"{1e3 * c['sequential']:8.2f} {c['batched'] / c['base']:13.2f} "
                f"{c['sequential'] / c['base']:9.2f} {c['sequential'] / c['batched']:12.2f}"
            )


if __name__ == "__main__":
    main()
