"""Finding and loading SD experts offline: formats, the HF cache, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402

from msdda.sd import MSDDAStableDiffusionPipeline  # noqa: E402
from msdda.sd.loading import resolve_expert_source  # noqa: E402
from msdda.sd.testing import (  # noqa: E402
    TinySDConfig,
    save_random_lora,
    save_tiny_pipeline,
    tiny_unet,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    base = save_tiny_pipeline(root / "base")
    expert = save_tiny_pipeline(root / "expert", unet_seed=1)
    unet = StableDiffusionPipeline.from_pretrained(base).unet
    lora = save_random_lora(unet, root / "lora" / "style.safetensors", seed=1)
    peft_dir = save_random_lora(unet, root / "peft", fmt="peft", seed=2)
    return {
        "root": root,
        "base": base,
        "expert": expert,
        "lora": lora,
        "peft": peft_dir,
        "unet": unet,
    }


def _fake_hf_cache(cache, repo_id, folder):
    """Lay out ``folder`` as the cached snapshot of ``repo_id`` (what `hf download` leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


# --------------------------------------------------------------------------- resolving
def test_sources_are_classified_by_their_files(disk):
    assert resolve_expert_source("a", disk["lora"]).kind == "lora"
    assert resolve_expert_source("a", disk["lora"].parent).path == disk["lora"]
    peft = resolve_expert_source("a", disk["peft"])
    assert (peft.kind, peft.lora_format) == ("lora", "peft")
    full = resolve_expert_source("a", disk["expert"])
    assert (full.kind, full.path.name) == ("unet", "unet") and full.scheduler_config is not None
    bare = resolve_expert_source("a", disk["expert"] / "unet")
    assert bare.kind == "unet" and bare.path == disk["expert"] / "unet"


def test_peft_folders_and_diffusers_files_of_one_adapter_agree(disk, tmp_path):
    """Same adapter, two formats: the same factors, with scale lora_alpha / r."""
    kw = dict(rank=3, alpha=6.0, target_modules=("to_k", "proj_in"), seed=5)
    peft = save_random_lora(disk["unet"], tmp_path / "p", fmt="peft", **kw)
    file = save_random_lora(disk["unet"], tmp_path / "f.safetensors", **kw)
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(
        disk["base"], experts={"p": peft, "f": file}
    )
    fp, ff = pipe.msdda_experts.get("p").factors, pipe.msdda_experts.get("f").factors
    assert fp.keys() == ff.keys() and len(fp) > 0
    for k in fp:
        assert fp[k].scale == ff[k].scale == 2.0
        assert torch.equal(fp[k].down, ff[k].down) and torch.equal(fp[k].up, ff[k].up)


def test_hub_ids_resolve_from_the_local_cache_only(disk, tmp_path):
    cache = _fake_hf_cache(tmp_path / "hub", "someone/tiny-expert", disk["expert"])
    src = resolve_expert_source("a", "someone/tiny-expert", cache_dir=cache)
    assert src.kind == "unet" and cache in src.path.parents
    with pytest.raises(ValueError, match="hf download someone/absent"):
        resolve_expert_source("a", "someone/absent", cache_dir=cache)


def test_base_and_experts_load_offline_from_the_hf_cache(disk, tmp_path):
    cache = _fake_hf_cache(tmp_path / "hub", "someone/tiny-sd", disk["base"])
    _fake_hf_cache(cache, "someone/tiny-expert", disk["expert"])
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(
        "someone/tiny-sd",
        experts={"dpo": "someone/tiny-expert", "style": disk["lora"]},
        cache_dir=cache,
    )
    assert pipe.expert_names == ["dpo", "style"]
    with pytest.raises(ValueError, match="hf download someone/nothing"):
        MSDDAStableDiffusionPipeline.from_pretrained("someone/nothing", cache_dir=cache)


def test_missing_weight_files_are_named(disk, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(disk["expert"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing weight file diffusion_pytorch_model.safetensors"):
        resolve_expert_source("dpo", broken)
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        resolve_expert_source("dpo", broken)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_expert_source("dpo", tmp_path / "nowhere" / "x.safetensors")
    peft = tmp_path / "peft"
    shutil.copytree(disk["peft"], peft)
    (peft / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing weight file"):
        resolve_expert_source("style", peft)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="pickle checkpoint"):
        resolve_expert_source("style", ckpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a UNet"):
        resolve_expert_source("style", empty)


# ------------------------------------------------------------------------ compatibility
def test_an_expert_with_another_architecture_is_refused(disk, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    tiny_unet(TinySDConfig(block_out_channels=(8, 24))).save_pretrained(other / "unet")
    with pytest.raises(ValueError, match=r"expert 'big'.*architecture differs.*block_out_channels"):
        MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"big": other})


def _with_scheduler_changes(pipeline, folder, **changes):
    """A copy of the pipeline folder ``pipeline`` at ``folder``, its scheduler config changed."""
    shutil.copytree(pipeline, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **changes}))
    return folder


def test_an_expert_with_other_noise_tables_is_refused(disk, tmp_path):
    other = _with_scheduler_changes(disk["expert"], tmp_path / "other", beta_end=0.02)
    with pytest.raises(ValueError, match=r"expert 'dpo'.*noise tables.*beta_end"):
        MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"dpo": other})


def test_an_expert_keeps_its_own_prediction_type(disk, tmp_path):
    other = _with_scheduler_changes(
        disk["expert"], tmp_path / "vpred", prediction_type="v_prediction"
    )
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"v": other})
    assert pipe.msdda_experts.get("v").prediction_type == "v_prediction"


def test_a_lora_for_another_architecture_is_refused(disk, tmp_path):
    wide = tiny_unet(TinySDConfig(block_out_channels=(8, 24)))
    lora = save_random_lora(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"expert 'wide'.*(does not fit|another architecture)"):
        MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"wide": lora})
    # the base is left clean: no peft layers behind
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(disk["base"])
    with pytest.raises(ValueError):
        pipe.load_experts({"wide": lora})
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())


def test_expert_names_are_checked(disk):
    with pytest.raises(ValueError, match="reserved"):
        MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"base": disk["lora"]})
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"a": disk["lora"]})
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_experts({"a": disk["peft"]})
    with pytest.raises(TypeError, match="mapping"):
        MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts=[disk["lora"]])
    with pytest.raises(TypeError, match="path or hub id"):
        pipe.load_experts({"b": 3})


def test_experts_can_be_added_and_removed_in_memory(disk):
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(disk["base"], experts={"a": disk["lora"]})
    pipe.add_expert_unet("u", StableDiffusionPipeline.from_pretrained(disk["expert"]).unet)
    assert pipe.expert_names == ["a", "u"]
    with pytest.raises(ValueError, match="architecture"):
        pipe.add_expert_unet("w", tiny_unet(TinySDConfig(block_out_channels=(8, 24))))
    pipe.remove_expert("a")
    assert pipe.expert_names == ["u"] and pipe.msdda_experts.bank is None
    with pytest.raises(ValueError, match="unknown expert 'a'"):
        pipe.remove_expert("a")
