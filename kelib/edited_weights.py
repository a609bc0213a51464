"""The matrices an editing run changes: their originals W_0, W ← W + ΔW with a check that the stored
matrix took ΔW, snapshots for a checkpoint, and the restore that returns the model as it came.

A run edits the MLP output projection of each edited layer (``mlp_out``) and, for editors that touch a
second projection (PMET's attention output), that one too: each (layer, part) is a *site*.

Half precision (issue #20): originals are exact float32 copies of half-precision weights, and while a
run edits them the sites are kept in float32 (:func:`kelib.models.keep_in_float32`); ``restore``
returns them to the model's dtype, exactly (the originals came from it).
"""

from __future__ import annotations

import torch

from kelib.editors.base import EditError
from kelib.models import get_weight, keep_in_float32, release_float32, same_device, set_weight

# Largest relative error ||W_stored - (W + ΔW)|| / ||ΔW|| of an applied update (0 in float32 storage).
APPLY_TOLERANCE = 1e-3

Site = tuple[int, str]  # (layer, part)


class EditedWeights:
    """The sites ``layers`` x (``mlp_out`` and ``other_parts``) of ``model``, with their originals."""

    def __init__(self, model, layers: list[int], other_parts: list[str] = ()):
        self.model = model
        self.layers = list(layers)
        # W_0 of each edited MLP output projection, by layer (what the regularizers measure against)
        self.originals = {layer: float32_copy(get_weight(model, layer)) for layer in self.layers}
        self.other_originals = {(part, layer): float32_copy(get_weight(model, layer, part))
                                for part in other_parts for layer in self.layers}
        self.sites: list[Site] = [(layer, "mlp_out") for layer in self.layers]
        self.sites += [(layer, part) for part, layer in self.other_originals]

    def half_precision_dtypes(self) -> list[str]:
        """The dtypes below float32 the sites are stored in (empty for a float32 or float64 model)."""
        return sorted({str(get_weight(self.model, layer, part).dtype).removeprefix("torch.")
                       for layer, part in self.sites} - {"float32", "float64"})

    def keep_in_float32(self, who: str) -> None:
        """Keep the sites in float32 when the model is in half precision; prints what it costs."""
        dtypes = {get_weight(self.model, layer, part).dtype for layer, part in self.sites}
        added = keep_in_float32(self.model, self.sites)
        if added:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            print(f"kelib: the {len(self.sites)} edited matrices of this {who} run are kept in "
                  f"float32 (the model stays in {names}): {added / 2**20:.1f} MiB more memory")

    def apply(self, update: dict[int, torch.Tensor], other_parts: dict[str, dict[int, torch.Tensor]]) -> None:
        """W ← W + ΔW at every site of ``update`` (``mlp_out``) and of ``other_parts``."""
        for layer, delta in update.items():
            self.add(layer, delta, "mlp_out")
        for part, deltas in other_parts.items():
            for layer, delta in deltas.items():
                self.add(layer, delta, part)

    def add(self, layer: int, delta: torch.Tensor, part: str = "mlp_out") -> None:
        """W ← W + ΔW (summed in float32), then check that the stored W took it: the relative error
        ||W_stored − (W + ΔW)|| / ||ΔW|| must be at most :data:`APPLY_TOLERANCE`.

        In float32 storage it is 0; a matrix stored in half precision would lose most of a small update
        to rounding (the error measured in bfloat16 for MEMIT's: 0.89), and the run would go on
        measuring rounding. The runner keeps edited matrices in float32, so this guards against a
        path that bypasses it (a module converted back, a model loaded differently)."""
        w = get_weight(self.model, layer, part)
        same_device(delta, w, what=f"the update of {part} at layer {layer} and W")
        intended = delta.float()
        wanted = w.float() + intended
        set_weight(self.model, layer, wanted, part)
        size = float(torch.linalg.norm(intended))
        if size == 0:
            return
        error = float(torch.linalg.norm(get_weight(self.model, layer, part).float() - wanted)) / size
        if not error <= APPLY_TOLERANCE:
            raise EditError(
                f"the update of {part} at layer {layer} was not applied as computed: stored in "
                f"{str(w.dtype).removeprefix('torch.')}, the applied change is {error:.3g} away from the "
                f"intended one (relative error; at most {APPLY_TOLERANCE:g} allowed). Keep the edited "
                "matrices in float32 (kelib.models.keep_in_float32) or load the model in float32"
            )

    def current(self, dtype: torch.dtype | None = None) -> dict[int, torch.Tensor]:
        """The edited MLP output projections as they are now, copied to the CPU (by layer)."""
        return {layer: get_weight(self.model, layer).detach().cpu().to(dtype or get_weight(self.model, layer).dtype)
                .clone() for layer in self.layers}

    def snapshot(self) -> dict:
        """Every site as it is now, on the CPU: ``{"weights": {layer: W}, "other_weights": {(part, layer): W}}``
        (the layout of a run's saved state)."""
        return {
            "weights": self.current(),
            "other_weights": {site: get_weight(self.model, site[1], site[0]).detach().cpu().clone()
                              for site in self.other_originals},
        }

    def load(self, snapshot: dict) -> None:
        """Set every site from a :meth:`snapshot`."""
        for layer, w in snapshot["weights"].items():
            set_weight(self.model, layer, w)
        for (part, layer), w in snapshot["other_weights"].items():
            set_weight(self.model, layer, w, part)

    def reset(self) -> None:
        """Every site back to W_0, checked (still kept in float32: the next unit of a run edits from here)."""
        self._set_originals()
        self.check_restored()

    def restore(self) -> None:
        """Every site back to W_0 and to the model's dtype, checked bit-identical: the model leaves the
        run as it came, so the next run's weights fingerprint does not depend on which runs came before."""
        self._set_originals()
        release_float32(self.model, self.sites)
        self.check_restored()

    def _set_originals(self) -> None:
        for (layer, part), w0 in self._originals():
            set_weight(self.model, layer, w0, part)

    def check_restored(self) -> None:
        for (layer, part), w0 in self._originals():
            if not torch.equal(get_weight(self.model, layer, part).to(w0.dtype), w0):
                raise RuntimeError(f"{part} of layer {layer} could not be restored exactly")

    def _originals(self) -> list[tuple[Site, torch.Tensor]]:
        sites = [((layer, "mlp_out"), w0) for layer, w0 in self.originals.items()]
        return sites + [((layer, part), w0) for (part, layer), w0 in self.other_originals.items()]


def float32_copy(weight: torch.Tensor) -> torch.Tensor:
    """An exact copy in at least float32: half precision widens, float32 and float64 stay as they are
    (a float64 model cast to float32 here would come back rounded from ``restore``)."""
    return weight.detach().to(torch.promote_types(weight.dtype, torch.float32), copy=True)
