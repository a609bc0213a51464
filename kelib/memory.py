"""What a run will hold in memory beyond the model, printed before it starts, and a refusal when it
cannot fit.

Sizes come from shapes alone (no tensor is allocated to measure them):

- key statistics C0: one ``d_in x d_in`` float32 matrix per edited layer, in RAM (:mod:`kelib.stats`);
  MEMIT and PMET also keep the Cholesky factor of λC0 (float64) per layer on the model's device, and
  every editor that solves against C0 holds one float64 copy of it there while it solves;
- D4S's state: A (``d_out x d_in``) and S (``d_in x d_in``) per edited layer, in float64 on the model's
  device as the authors keep them, or float32 on the CPU (``state_device: cpu``); its solve holds one
  float64 ``d_in x d_in`` system and a copy of A on the model's device;
- edited matrices kept in float32 inside a half-precision model (:func:`kelib.models.keep_in_float32`).

Activations and lm-eval's batches are not counted: the check refuses what cannot fit, it does not
promise that what passes will.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from kelib.models import ModelError, device_of, get_weight

FLOAT64, FLOAT32 = 8, 4


class MemoryPlanError(ModelError):
    """A run whose estimated memory exceeds what its device (or the RAM) has free."""


@dataclass
class MemoryPlan:
    """Bytes a run adds, per device (``"cpu"`` is the RAM), with one line per item for the printout."""

    needs: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def add(self, device, nbytes: int, line: str) -> None:
        key = _key(device)
        self.needs[key] = self.needs.get(key, 0) + int(nbytes)
        self.lines.append(f"{line}: {gib(nbytes)} on {key}")


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def available_bytes(device) -> int | None:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` for a GPU, the available RAM for the CPU;
    None where it cannot be told (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover (psutil comes with jupyter)
            return None
    return None


def d4s_state_bytes(shapes: dict[int, tuple[int, int]], dtype: torch.dtype = torch.float64) -> int:
    """A (``d_out x d_in``) and S (``d_in x d_in``) of every layer in ``shapes`` ({layer: (d_out, d_in)})."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum((d_out * d_in + d_in * d_in) * size for d_out, d_in in shapes.values())


def statistics_bytes(shapes: dict[int, tuple[int, int]]) -> int:
    """C0 of every layer in ``shapes``: ``d_in x d_in`` float32."""
    return sum(d_in * d_in * FLOAT32 for _, d_in in shapes.values())


def d4s_state_placement(params, weights_device) -> tuple[torch.device, torch.dtype]:
    """Where and in which precision D4S keeps A and S for these :class:`~kelib.regularizers.D4SParams`,
    for edited weights on ``weights_device``."""
    on_cpu = params.state_device == "cpu"
    dtype = params.state_dtype or ("float32" if on_cpu else "float64")
    return torch.device("cpu") if on_cpu else torch.device(weights_device), getattr(torch, dtype)


def run_plan(model, editor: str, layers: Sequence[int], regularizer: str = "none", regularizer_params=None,
             uses_statistics: bool = True) -> MemoryPlan:
    """The memory a run of ``editor`` (+ ``regularizer``) on ``layers`` adds, per device."""
    shapes = {layer: tuple(get_weight(model, layer).shape) for layer in layers}
    device = device_of(model)
    plan = MemoryPlan()
    n = len(shapes)
    d_ins = sorted({d_in for _, d_in in shapes.values()})
    if uses_statistics:
        plan.add("cpu", statistics_bytes(shapes), f"key statistics C0 of {n} layer(s) (d_in {d_ins}, float32)")
        biggest = max(d_in for _, d_in in shapes.values()) ** 2 * FLOAT64
        cached = n if editor in ("MEMIT", "PMET") else 1
        what = "λC0's Cholesky factors (float64, kept)" if cached > 1 else "C0 while solving (float64)"
        plan.add(device, biggest * cached, what)
    half = [layer for layer in layers if get_weight(model, layer).dtype in (torch.float16, torch.bfloat16)]
    if half:
        extra = sum(shapes[layer][0] * shapes[layer][1] * 2 for layer in half)
        plan.add(device, extra, f"{len(half)} edited matrices kept in float32")
    if regularizer == "D4S":
        from kelib.regularizers import D4SParams
        from kelib.config import from_dict

        params = regularizer_params if isinstance(regularizer_params, D4SParams) else from_dict(
            D4SParams, dict(regularizer_params or {}), where="regularizer D4S")
        state_device, dtype = d4s_state_placement(params, device_of(model))
        plan.add(state_device, d4s_state_bytes(shapes, dtype),
                 f"D4S state A and S of {n} layer(s) ({str(dtype).removeprefix('torch.')})")
        d_out, d_in = max(shapes.values(), key=lambda s: s[1])
        plan.add(device, (d_in * d_in + d_out * d_in) * FLOAT64, "D4S's solve (float64 system and A, one layer)")
    return plan


def check_plan(plan: MemoryPlan, label: str, verbose: bool = True) -> None:
    """Print ``plan`` and raise :class:`MemoryPlanError` when a device has less free than it needs."""
    if verbose:
        for line in plan.lines:
            print(f"kelib: {label}: {line}")
    for device, needed in plan.needs.items():
        free = available_bytes(device)
        if free is not None and needed > free:
            options = []
            if any("D4S state" in line for line in plan.lines):
                options.append("keep D4S's state in float32 on the CPU (regularizer_params: {state_device: cpu})")
            if device != "cpu":
                options += ["load the model in bfloat16 or float16 (dtype)", "spread it over GPUs (device_map: auto)"]
            options.append("edit fewer layers")
            advice = " To fit: " + "; ".join(options) + "."
            raise MemoryPlanError(
                f"{label} would not fit: it needs about {gib(needed)} more on {device}, which has {gib(free)} "
                f"free ({'; '.join(plan.lines)}).{advice}")
