"""Cost of one MSDDA fusion step next to one denoiser forward.

Times ``fuse_gaussians`` for K experts (float32, per-element means and variances, the
general learned-variance case) on a batch of SD-like latents, and one forward of a tiny
diffusers ``UNet2DConditionModel`` built from a config (random weights) on the same
batch, in the same run. Reports medians over repeats after warm-up, and their ratio.

    .venv/bin/python benchmarks/bench_fusion.py                # batch 4 of 4x64x64, CPU
    .venv/bin/python benchmarks/bench_fusion.py --batch 1 --device cuda
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import typer
from rich.console import Console
from rich.table import Table

from msdda import fuse_gaussians


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 4  # latents per batch
    channels: int = 4  # latent channels (SD VAE)
    size: int = 64  # latent height = width
    experts: tuple[int, ...] = (2, 4, 8)  # K values to time
    repeats: int = 50  # timed fusion calls per K (median reported)
    unet_repeats: int = 5  # timed UNet forwards (slow on CPU)
    warmup: int = 2  # untimed calls before each measurement
    text_tokens: int = 77  # encoder_hidden_states length
    device: str = "cpu"


def bench_unet():
    """A small SD-shaped UNet2DConditionModel (cross-attention at the top level), random weights.

    The project's tiny UNet builder (:func:`msdda.sd.testing.tiny_unet`) at the sizes this
    benchmark has always timed: channels (32, 64), 64x64 latents, 32-wide text embeddings.
    """
    from msdda.sd.testing import TinySDConfig, tiny_unet

    config = TinySDConfig(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=64,
    )
    return tiny_unet(
        config,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def median_seconds(fn: Callable[[], object], cfg: BenchConfig, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after warm-up."""

    def sync() -> None:
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(cfg.warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fusion_inputs(k: int, cfg: BenchConfig, generator: torch.Generator):
    """K experts' means and per-element variances, (B, C, H, W) float32 each."""
    shape = (cfg.batch, cfg.channels, cfg.size, cfg.size)
    means = [torch.randn(shape, generator=generator).to(cfg.device) for _ in range(k)]
    variances = [(torch.rand(shape, generator=generator) + 0.1).to(cfg.device) for _ in range(k)]
    weights = [1.0 / k] * k
    return means, variances, weights


def run(cfg: BenchConfig) -> tuple[float, dict[int, float]]:
    """(seconds per UNet forward, {K: seconds per fusion step})."""
    g = torch.Generator().manual_seed(0)
    unet = bench_unet().to(cfg.device)
    latents = torch.randn(cfg.batch, cfg.channels, cfg.size, cfg.size, generator=g).to(cfg.device)
    text = torch.randn(cfg.batch, cfg.text_tokens, 32, generator=g).to(cfg.device)
    t = torch.full((cfg.batch,), 500, dtype=torch.long, device=cfg.device)
    with torch.inference_mode():
        unet_s = median_seconds(
            lambda: unet(latents, t, encoder_hidden_states=text).sample, cfg, cfg.unet_repeats
        )
        fusion_s = {}
        for k in cfg.experts:
            means, variances, weights = fusion_inputs(k, cfg, g)
            fusion_s[k] = median_seconds(
                lambda m=means, v=variances, w=weights: fuse_gaussians(m, v, w), cfg, cfg.repeats
            )
    return unet_s, fusion_s


def report(cfg: BenchConfig, unet_s: float, fusion_s: dict[int, float]) -> Table:
    table = Table(
        title=(
            f"fuse_gaussians vs one tiny UNet2DConditionModel forward: batch {cfg.batch} of "
            f"{cfg.channels}x{cfg.size}x{cfg.size} latents, float32, {cfg.device}, "
            f"{torch.get_num_threads()} thread(s); medians of {cfg.repeats} fusions and "
            f"{cfg.unet_repeats} forwards"
        )
    )
    for col in ("K experts", "fusion step (ms)", "UNet forward (ms)", "fusion / forward (%)"):
        table.add_column(col, justify="right")
    for k, s in fusion_s.items():
        table.add_row(str(k), f"{s * 1e3:.2f}", f"{unet_s * 1e3:.1f}", f"{100 * s / unet_s:.3f}")
    return table


def main(
    batch: int = typer.Option(4, min=1, help="Latents per batch."),
    repeats: int = typer.Option(50, min=1, help="Timed fusion calls per K."),
    unet_repeats: int = typer.Option(5, min=1, help="Timed UNet forwards."),
    threads: int = typer.Option(1, min=1, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Time one fusion step for K = 2, 4, 8 next to one UNet forward."""
    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
    cfg = BenchConfig(batch=batch, repeats=repeats, unet_repeats=unet_repeats, device=device)
    unet_s, fusion_s = run(cfg)
    Console(width=140).print(report(cfg, unet_s, fusion_s))


if __name__ == "__main__":
    typer.run(main)
