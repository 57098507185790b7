"""LoRA adapters: one update rule, one on-disk key format, one batched application.

A LoRA expert changes a layer ``y = W x + b`` into ``y = W x + b + s * B (A x)`` with
low-rank factors A (r, in) and B (out, r) and a scale s (peft's ``alpha / r``). One
:class:`LoRAFactors` holds one layer's update, whatever the domain:

- merged into the weights: :func:`lora_delta_weight` (``s * B A``) and
  :func:`merge_lora` (``W' = W + s * B A`` on a state dict), peft's arithmetic;
- on disk: peft's adapter state dict (``base_model.model.<module>.lora_A.weight`` (r, in)
  and ``...lora_B.weight`` (out, r)), read by :func:`factors_from_peft_state`;
  :func:`peft_saved_modules` returns the tensors of modules peft trains in full
  (``modules_to_save``); :func:`extract_lora_factors` reads them from peft's layers;
- in memory, K experts of one base in one forward: :class:`LoRABank`.

K experts of one base differ only in their factors, so one forward of the base on a
batch made of K contiguous groups of samples can apply expert k's update to group k:

    y[group k] = W x[group k] + b + s_k B_k (A_k x[group k])

:class:`LoRABank` holds every expert's factors, stacked per layer as
``A^T (E + 1, in, r_max)`` and ``(s B)^T (E + 1, r_max, out)`` (ranks zero-padded to
r_max, which changes nothing; slot E is all zeros: "no adapter", the base). A forward
hook on each adapted layer adds the update of every group with two grouped matmuls
(``torch.bmm`` over the expert axis; 1x1 convolutions the same per pixel; larger
kernels one small convolution per group), instead of peft's Python loop over
sub-batches with gathers, scatters, dropout and dtype casts.
The factors are read from peft's layers once, after peft loaded them, and the model is
then restored to its plain modules: the hooks never change its state dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LORA_MODES",
    "PEFT_PREFIX",
    "LoRAFactors",
    "LoRABank",
    "extract_lora_factors",
    "factors_from_peft_state",
    "lora_delta_weight",
    "merge_lora",
    "peft_lora_keys",
    "peft_saved_modules",
]

#: Prefix of every key in peft's adapter state dict (``get_peft_model_state_dict``).
PEFT_PREFIX = "base_model.model."
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"

#: How LoRA experts run: ``batched`` one forward of the base UNet with every expert's
#: group (memory: one UNet + adapters); ``sequential`` one base forward per expert;
#: ``merged`` one full UNet per expert with its update merged into the weights
#: (memory: K UNets); ``auto`` picks ``batched``.
LORA_MODES = ("auto", "batched", "sequential", "merged")


@dataclass(frozen=True, eq=False)
class LoRAFactors:
    """One adapter's update of one layer: delta W = scale * up @ down.

    Linear layers: ``down`` (r, in), ``up`` (out, r). Conv2d layers: ``down``
    (r, in, kh, kw) applied with ``stride``/``padding``/``dilation``, ``up`` (out, r)
    a 1x1 convolution.
    """

    down: Tensor
    up: Tensor
    scale: float
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4


def lora_delta_weight(f: LoRAFactors) -> Tensor:
    """The dense update s * B A, shaped like the base weight ((out, in) or (out, in, kh, kw))."""
    up = f.up.float()
    down = f.down.float()
    if f.is_conv:
        delta = torch.einsum("or,rikl->oikl", up, down)
    else:
        delta = up @ down
    return (f.scale * delta).to(f.down.dtype)


def merge_lora(
    state_dict: Mapping[str, Tensor], factors: Mapping[str, LoRAFactors]
) -> dict[str, Tensor]:
    """``state_dict`` with each layer's update merged: ``<path>.weight`` + s * B A.

    ``factors`` maps module paths to their update (:func:`lora_delta_weight`, moved to
    the weight's device), added in float32 and cast to the weight's dtype. Pure: returns
    a new dict, the other entries shared with ``state_dict``.

    Raises:
        ValueError: for a path without a weight in ``state_dict``, or an update of
            another shape than its weight.
    """
    merged = dict(state_dict)
    for path, f in factors.items():
        key = f"{path}.weight"
        if key not in state_dict:
            raise ValueError(f"LoRA factors for {path!r}, which has no weight {key!r}")
        w = state_dict[key]
        delta = lora_delta_weight(f).to(w.device)
        if delta.shape != w.shape:
            raise ValueError(
                f"the LoRA update of {path!r} has shape {tuple(delta.shape)}, its weight "
                f"{tuple(w.shape)}"
            )
        merged[key] = (w.float() + delta.float()).to(w.dtype)
    return merged


def peft_lora_keys(module: str) -> tuple[str, str]:
    """The (A, B) keys of ``module``'s factors in peft's adapter state dict."""
    return f"{PEFT_PREFIX}{module}{_DOWN}", f"{PEFT_PREFIX}{module}{_UP}"


def factors_from_peft_state(state: Mapping[str, Tensor], scale: float) -> dict[str, LoRAFactors]:
    """``{module path: LoRAFactors}`` of the LoRA layers in peft's adapter state dict.

    Every ``<module>.lora_A.weight`` (r, in) needs its ``<module>.lora_B.weight``
    (out, r); ``scale`` is peft's ``alpha / r``. Keys of other tensors (modules peft
    trains in full, :func:`peft_saved_modules`) are left out.

    Raises:
        ValueError: for a key without peft's prefix, an A without its B (or the other
            way round), or factors that are not a linear layer's.
    """
    out: dict[str, LoRAFactors] = {}
    for key in state:
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{key!r} is not a peft adapter key (no {PEFT_PREFIX!r} prefix)")
        name = key.removeprefix(PEFT_PREFIX)
        if not name.endswith((_DOWN, _UP)):
            continue
        module = name.removesuffix(_DOWN).removesuffix(_UP)
        down_key, up_key = peft_lora_keys(module)
        if down_key not in state or up_key not in state:
            raise ValueError(f"LoRA layer {module!r} needs both {down_key!r} and {up_key!r}")
        down, up = state[down_key], state[up_key]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"LoRA layer {module!r}: factors {tuple(down.shape)}/{tuple(up.shape)} are "
                "not a linear layer's (r, in)/(out, r)"
            )
        out[module] = LoRAFactors(down, up, float(scale))
    return out


def peft_saved_modules(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of peft's adapter state dict that are not LoRA factors, by model key.

    These are modules peft trains in full (``modules_to_save``); their keys lose peft's
    prefix, e.g. ``base_model.model.head.bias`` -> ``head.bias``.
    """
    return {
        key.removeprefix(PEFT_PREFIX): value
        for key, value in state.items()
        if not key.endswith((_DOWN, _UP))
    }


def extract_lora_factors(module_root: nn.Module, adapter_name: str) -> dict[str, LoRAFactors]:
    """Every layer's factors of peft adapter ``adapter_name`` in ``module_root``.

    Returns ``{module path: LoRAFactors}``, the paths those of the plain (unwrapped)
    model. Raises ValueError for what a plain low-rank update cannot express (DoRA,
    LoRA biases, grouped convolutions, other layer types).
    """
    from peft.tuners.lora import layer as lora_layer

    out: dict[str, LoRAFactors] = {}
    for path, m in module_root.named_modules():
        if not isinstance(m, lora_layer.LoraLayer) or adapter_name not in m.lora_A:
            continue
        if m.use_dora.get(adapter_name, False) or adapter_name in getattr(m, "lora_variant", {}):
            raise ValueError(
                f"adapter {adapter_name!r} at {path!r} is a LoRA variant (DoRA or similar); only "
                "plain LoRA updates are supported"
            )
        if m.lora_bias.get(adapter_name, False):
            raise ValueError(f"adapter {adapter_name!r} at {path!r} has a LoRA bias; not supported")
        base = m.get_base_layer()
        a = m.lora_A[adapter_name]
        b = m.lora_B[adapter_name]
        scale = float(m.scaling[adapter_name])
        if isinstance(m, lora_layer.Linear) and isinstance(base, nn.Linear):
            if getattr(m, "fan_in_fan_out", False):
                raise ValueError(f"adapter {adapter_name!r} at {path!r}: fan_in_fan_out layers")
            f = LoRAFactors(a.weight.detach(), b.weight.detach(), scale)
        elif isinstance(m, lora_layer.Conv2d) and isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"adapter {adapter_name!r} at {path!r}: grouped convolution")
            f = LoRAFactors(
                a.weight.detach(),
                b.weight.detach().flatten(1),
                scale,
                stride=tuple(a.stride),
                padding=a.padding if isinstance(a.padding, str) else tuple(a.padding),
                dilation=tuple(a.dilation),
            )
        else:
            raise ValueError(
                f"adapter {adapter_name!r} at {path!r}: LoRA on {type(base).__name__} layers is not "
                "supported (Linear and Conv2d are)"
            )
        out[path] = f
    return out


class _Route:
    """Which adapter each contiguous group of the batch uses (shared by every hook)."""

    def __init__(self) -> None:
        self.slots: tuple[int, ...] | None = None  # None: no adapter anywhere (plain base)


class _GroupHook:
    """A forward hook adding each batch group's adapter update to a layer's output.

    While a route is set, the layer's batch is ``len(route.slots)`` contiguous equal
    groups and group j gets the update of adapter slot ``route.slots[j]``; with no route
    the hook leaves the output alone. Subclasses compute the update in :meth:`update`.
    """

    def __init__(self, route: _Route) -> None:
        self.route = route

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        slots = self.route.slots
        if slots is None:
            return None
        x = args[0]
        if x.shape[0] % len(slots):
            raise ValueError(
                f"a batch of {x.shape[0]} does not split into {len(slots)} expert groups"
            )
        return self.update(slots, x, output)

    def update(self, slots: tuple[int, ...], x: Tensor, output: Tensor) -> Tensor:
        """``output`` (B, ...) plus group j's update for slot ``slots[j]``, from input ``x``."""
        raise NotImplementedError


class _LinearHook(_GroupHook):
    """Adds s_k B_k A_k x to group k of a Linear layer's output, as two grouped matmuls."""

    def __init__(self, route: _Route, down_t: Tensor, up_t: Tensor) -> None:
        super().__init__(route)
        self.down_t = down_t  # (E + 1, in, r_max), scale folded into up_t
        self.up_t = up_t  # (E + 1, r_max, out)
        self._cache: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def _factors(self, slots: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
        hit = self._cache.get(slots)
        if hit is not None and hit[0].device == like.device and hit[0].dtype == like.dtype:
            return hit
        if self.down_t.device != like.device:
            self.down_t = self.down_t.to(like.device)
            self.up_t = self.up_t.to(like.device)
        idx = torch.tensor(slots, device=like.device)
        down = self.down_t.index_select(0, idx).to(like.dtype)
        up = self.up_t.index_select(0, idx).to(like.dtype)
        if len(self._cache) >= 8:  # a handful of routes recur across steps; keep it bounded
            self._cache.clear()
        self._cache[slots] = (down, up)
        return down, up

    def clear(self) -> None:
        self._cache.clear()

    def update(self, slots: tuple[int, ...], x: Tensor, output: Tensor) -> Tensor:
        k = len(slots)
        down, up = self._factors(slots, x)
        h = torch.bmm(x.reshape(k, -1, x.shape[-1]), down)  # (K, M, r)
        out = output.view(k, -1, output.shape[-1])
        if torch.is_grad_enabled():
            return torch.baddbmm(out, h, up).view_as(output)
        out.baddbmm_(h, up)  # in place: no copy of the layer's output
        return output


class _PointwiseConvHook(_LinearHook):
    """1x1 convolutions (SD 1.x's proj_in/proj_out): the Linear update over channels, per pixel.

    Stacks as in :class:`_LinearHook` (``down_t`` (E + 1, C_in, r), ``up_t`` (E + 1, r, C_out));
    the channel matmuls broadcast over each group's samples and pixels without copies.
    """

    def update(self, slots: tuple[int, ...], x: Tensor, output: Tensor) -> Tensor:
        k = len(slots)
        down, up = self._factors(slots, x)
        xs = x.reshape(k, x.shape[0] // k, x.shape[1], -1)  # (K, G, C_in, HW)
        h = torch.matmul(down.transpose(1, 2).unsqueeze(1), xs)  # (K, G, r, HW)
        delta = torch.matmul(up.transpose(1, 2).unsqueeze(1), h)  # (K, G, C_out, HW)
        if torch.is_grad_enabled() or not output.is_contiguous():
            return output + delta.view_as(output)
        output.view_as(delta).add_(delta)
        return output


def _is_pointwise(f: LoRAFactors) -> bool:
    return (
        f.is_conv
        and tuple(f.down.shape[2:]) == (1, 1)
        and tuple(f.stride) == (1, 1)
        and tuple(f.dilation) == (1, 1)
        and f.padding in ((0, 0), "valid")
    )


class _ConvHook(_GroupHook):
    """Adds the 1x1-conv(up) . conv(down) update of each group to a Conv2d layer's output."""

    def __init__(self, route: _Route, factors: Sequence[LoRAFactors | None]) -> None:
        super().__init__(route)
        self.factors = list(factors)  # per expert slot; None: not adapted by that expert

    def update(self, slots: tuple[int, ...], x: Tensor, output: Tensor) -> Tensor:
        g = x.shape[0] // len(slots)
        parts = []
        for j, slot in enumerate(slots):
            out_j = output[j * g : (j + 1) * g]
            f = self.factors[slot] if slot < len(self.factors) else None
            if f is None:
                parts.append(out_j)
                continue
            down = f.down.to(device=x.device, dtype=x.dtype)
            up = (f.scale * f.up).to(device=x.device, dtype=x.dtype)
            h = F.conv2d(x[j * g : (j + 1) * g], down, None, f.stride, f.padding, f.dilation)
            parts.append(out_j + torch.einsum("or,brhw->bohw", up, h))
        return torch.cat(parts)


class LoRABank:
    """K LoRA experts of one base model, applied per batch group through forward hooks.

    Args:
        names: the experts' names, in slot order 0..K-1.
        factors: per expert, ``{module path: LoRAFactors}`` (paths of ``model``).
        model: the base model (a UNet) the factors belong to.

    Use :meth:`route` around a forward whose batch is K' contiguous equal groups::

        with bank.route([0, None, 1]):   # expert 0, base, expert 1
            out = unet(x, ...)           # x.shape[0] divisible by 3
    """

    def __init__(
        self,
        names: Sequence[str],
        factors: Sequence[Mapping[str, LoRAFactors]],
        model: nn.Module,
    ) -> None:
        if len(names) != len(factors):
            raise ValueError(f"{len(names)} names for {len(factors)} factor sets")
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {list(names)}")
        self.names = list(names)
        self._route = _Route()
        self._handles: list = []
        self._hooks: list[_GroupHook] = []
        self.num_layers = 0
        modules = dict(model.named_modules())
        paths = sorted({p for fs in factors for p in fs})
        for path in paths:
            layer = modules.get(path)
            if layer is None:
                raise ValueError(f"LoRA factors for {path!r}, which the model does not have")
            per_slot = [fs.get(path) for fs in factors]
            if isinstance(layer, nn.Linear):
                hook = self._linear_hook(layer, per_slot, path)
            elif isinstance(layer, nn.Conv2d) and all(
                _is_pointwise(f) for f in per_slot if f is not None
            ):
                hook = self._linear_hook(layer, per_slot, path, pointwise=True)
            elif isinstance(layer, nn.Conv2d):
                hook = _ConvHook(self._route, per_slot)
            else:
                raise ValueError(f"LoRA on {type(layer).__name__} at {path!r} is not supported")
            self._hooks.append(hook)
            self._handles.append(layer.register_forward_hook(hook))
        self.num_layers = len(paths)
        self._factors = [dict(fs) for fs in factors]

    def _linear_hook(
        self,
        layer: nn.Linear | nn.Conv2d,
        per_slot: Sequence[LoRAFactors | None],
        path: str,
        *,
        pointwise: bool = False,
    ) -> _LinearHook:
        r_max = max(f.rank for f in per_slot if f is not None)
        n = len(per_slot)
        w = layer.weight
        n_in, n_out = (w.shape[1], w.shape[0])
        down_t = torch.zeros(n + 1, n_in, r_max, dtype=w.dtype, device=w.device)
        up_t = torch.zeros(n + 1, r_max, n_out, dtype=w.dtype, device=w.device)
        for i, f in enumerate(per_slot):
            if f is None:
                continue
            if f.is_conv != pointwise or f.down.shape[1] != n_in or f.up.shape[0] != n_out:
                raise ValueError(
                    f"LoRA factors of {self.names[i]!r} at {path!r} have shapes "
                    f"{tuple(f.down.shape)}/{tuple(f.up.shape)}, which do not fit the "
                    f"{type(layer).__name__} {n_in}->{n_out}"
                )
            down_t[i, :, : f.rank] = f.down.flatten(1).t().to(w.dtype)
            up_t[i, : f.rank, :] = (f.scale * f.up.float()).t().to(w.dtype)
        cls = _PointwiseConvHook if pointwise else _LinearHook
        return cls(self._route, down_t, up_t)

    @property
    def num_experts(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        """Bytes of the adapters: their factors plus the stacked copies the hooks use
        (what K experts cost beyond the base model)."""
        factors = {id(t): t for fs in self._factors for f in fs.values() for t in (f.down, f.up)}
        stacks = [t for h in self._hooks if isinstance(h, _LinearHook) for t in (h.down_t, h.up_t)]
        return sum(t.numel() * t.element_size() for t in [*factors.values(), *stacks])

    def factors(self, name: str) -> dict[str, LoRAFactors]:
        return self._factors[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no LoRA expert named {name!r}; have {self.names}") from None

    @contextmanager
    def route(self, groups: Sequence[int | None]) -> Iterator[None]:
        """Apply expert ``groups[j]`` (None: no adapter) to the j-th of len(groups) batch groups."""
        if len(groups) == 0:
            raise ValueError("groups is empty")
        slots = []
        for g in groups:
            if g is None:
                slots.append(self.num_experts)
            elif isinstance(g, int) and 0 <= g < self.num_experts:
                slots.append(g)
            else:
                raise ValueError(
                    f"group adapter {g!r} is not an expert index in [0, {self.num_experts})"
                )
        previous = self._route.slots
        self._route.slots = None if all(s == self.num_experts for s in slots) else tuple(slots)
        try:
            yield
        finally:
            self._route.slots = previous

    def merged_state_dict(self, model: nn.Module, name: str) -> dict[str, Tensor]:
        """``model``'s state dict with expert ``name``'s updates merged into its weights."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return merge_lora(state, self.factors(name))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LoRABank:
        """Move (and cast) the stacked factors, as ``nn.Module.to`` does for the model."""
        for h in self._hooks:
            if isinstance(h, _LinearHook):
                h.down_t = h.down_t.to(device=device, dtype=dtype)
                h.up_t = h.up_t.to(device=device, dtype=dtype)
                h.clear()
        return self

    def remove(self) -> None:
        """Detach every hook: the model is the plain base again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
