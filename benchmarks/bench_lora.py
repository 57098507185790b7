"""Cost of K LoRA experts per MSDDA step: batched, one after another, merged, and peft's mixed batch.

For two UNet sizes (a tiny SD UNet, and one with 64-128 channels at a 32x32 latent) and
K = 2 and 4 LoRA experts (rank 4 on the attention projections, as diffusers' LoRA
training script makes them), it times one UNet evaluation per sampling step of every
way to run the experts, for one image with classifier-free guidance (2 rows per model):

- ``base``: the base UNet alone (batch 2): the unit of the ratios;
- ``batched``: msdda's LoRABank, all K experts in one forward (batch 2K);
- ``peft-mixed``: peft's mixed-adapter batch (``adapter_names``), batch 2K;
- ``sequential``: K forwards of the base with one adapter each (batch 2);
- ``merged``: K full UNets with the LoRA merged in, one forward each (batch 2);
- ``floor``: the base UNet on batch 2K, the arithmetic of K experts with no LoRA cost;

then the whole MSDDA step through the pipeline (batched forward, K step Gaussians and
their fusion), and the parameter memory of K LoRA experts against K full UNets.
Timings are interleaved round-robin and the fastest of the rounds is reported, so that
load from other processes hits every variant alike and disturbs the figures least.

    .venv/bin/python benchmarks/bench_lora.py            # both sizes, K = 2 and 4
    .venv/bin/python benchmarks/bench_lora.py --sizes tiny --ks 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from msdda.sd import LoRABank, MSDDAStableDiffusionPipeline, extract_lora_factors
from msdda.sd.testing import (
    TinySDConfig,
    random_lora,
    save_random_lora,
    tiny_sd_components,
    tiny_unet,
)

_TINY = TinySDConfig(
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
    sample_size=16,
)
SIZES = {
    "tiny": _TINY,
    "64-128": replace(_TINY, block_out_channels=(64, 128), cross_attention_dim=64, sample_size=32),
}
TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "full": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
    ),
}


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peft_mixed(unet: torch.nn.Module, names: list[str]) -> list:
    """Make every peft LoRA layer take ``adapter_names`` (peft's mixed-batch inference)."""
    from peft.tuners.lora import LoraLayer

    def pre(module, args, kwargs, adapter_names):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    return [
        m.register_forward_pre_hook(partial(pre, adapter_names=names), with_kwargs=True)
        for m in unet.modules()
        if isinstance(m, LoraLayer)
    ]


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds per call of each function, timed round-robin after one warm-up call.

    The minimum is the run least disturbed by other processes on a shared machine."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def forward_costs(cfg: TinySDConfig, k: int, targets, rank: int, repeats: int) -> dict:
    base = tiny_unet(cfg)
    with_peft = copy.deepcopy(base)
    names = [f"e{i}" for i in range(k)]
    for i, n in enumerate(names):
        random_lora(
            with_peft, rank=rank, alpha=rank, target_modules=targets, seed=i, adapter_name=n
        )
    factors = [extract_lora_factors(with_peft, n) for n in names]
    ours = copy.deepcopy(base)
    bank = LoRABank(names, factors, ours)
    merged = []
    for n in names:
        m = copy.deepcopy(base)
        m.load_state_dict(bank.merged_state_dict(base, n))
        merged.append(m)
    _peft_mixed(with_peft, [n for n in names for _ in range(2)])

    s, d = cfg.sample_size, cfg.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    x2, e2 = torch.randn(2, 4, s, s, generator=g), torch.randn(2, 77, d, generator=g)
    xk, ek = x2.repeat(k, 1, 1, 1), e2.repeat(k, 1, 1)
    t = torch.tensor(500)

    def batched():
        with bank.route(list(range(k))):
            return ours(xk, t, ek)

    def sequential():
        for i in range(k):
            with bank.route([i]):
                ours(x2, t, e2)

    fns = {
        "base": lambda: base(x2, t, e2),
        "batched": batched,
        "peft-mixed": lambda: with_peft(xk, t, ek),
        "sequential": sequential,
        "merged": lambda: [m(x2, t, e2) for m in merged],
        "floor": lambda: base(xk, t, ek),
    }
    with torch.no_grad():
        med = _interleaved(fns, repeats)
    return {
        "times": med,
        "base_bytes": _param_bytes(base),
        "lora_bytes": bank.nbytes,
        "k": k,
    }


def pipeline_step_cost(
    cfg: TinySDConfig, k: int, targets, rank: int, steps: int
) -> tuple[float, float]:
    """Fastest seconds per MSDDA step through the pipeline: (K LoRA experts batched, base alone)."""
    comps = tiny_sd_components(cfg)
    pipe = MSDDAStableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        experts = {
            f"e{i}": save_random_lora(
                comps["unet"],
                Path(tmp) / f"e{i}.safetensors",
                rank=rank,
                alpha=rank,
                target_modules=targets,
                seed=i,
            )
            for i in range(k)
        }
        pipe.load_experts(experts)
    size = cfg.sample_size * pipe.vae_scale_factor

    def per_step(weights) -> list[float]:
        stamps: list[float] = []
        pipe(
            "a photo",
            weights,
            num_inference_steps=steps,
            height=size,
            width=size,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            callback=lambda i, t, x: stamps.append(time.perf_counter()),
        )
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    uniform = {n: 1.0 / k for n in experts}
    fused: list[float] = []
    alone: list[float] = []  # weights all 0: the base (the reference) alone, same loop
    per_step(uniform)
    for _ in range(3):  # interleaved
        fused += per_step(uniform)
        alone += per_step({})
    return min(fused), min(alone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,64-128", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--ks", default="2,4", help="numbers of experts")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per variant")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--targets", choices=list(TARGETS), default="attn")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=6, help="pipeline steps for the MSDDA-step timing")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # peft: several adapters in one model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = TARGETS[args.targets]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); LoRA rank {args.rank} on {targets}; "
        f"1 image with CFG (2 rows per model); fastest of {args.repeats} interleaved rounds"
    )
    for size in args.sizes.split(","):
        cfg = SIZES[size]
        for k in (int(v) for v in args.ks.split(",")):
            r = forward_costs(cfg, k, targets, args.rank, args.repeats)
            t = r["times"]
            b = t["base"]
            print(
                f"\n[{size}: channels {cfg.block_out_channels}, latent {cfg.sample_size}x{cfg.sample_size}, K = {k}]"
            )
            print(f"  {'variant':<12}{'ms/step':>10}{'x base':>9}{'x floor':>9}")
            for name in ("base", "batched", "peft-mixed", "sequential", "merged", "floor"):
                print(
                    f"  {name:<12}{t[name] * 1e3:>10.1f}{t[name] / b:>9.2f}{t[name] / t['floor']:>9.2f}"
                )
            fused, alone = pipeline_step_cost(cfg, k, targets, args.rank, args.steps)
            print(
                f"  MSDDA step through the pipeline (batched + fusion): {fused * 1e3:.1f} ms = "
                f"{fused / alone:.2f}x the pipeline's base step ({alone * 1e3:.1f} ms)"
            )
            ub, lb = r["base_bytes"], r["lora_bytes"]
            print(
                f"  parameter memory: one UNet {ub / 2**20:.2f} MiB; K LoRA experts = one UNet + "
                f"{lb / 2**20:.3f} MiB of adapters and their stacks ({(ub + lb) / ub:.3f}x one UNet); K full UNets "
                f"(merged) = {k * ub / 2**20:.2f} MiB ({k:.0f}x)"
            )


if __name__ == "__main__":
    main()
