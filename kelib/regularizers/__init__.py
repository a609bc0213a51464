"""Regularizers: RECT, PRUNE and D4S transform editors' updates (see :mod:`kelib.regularizers.base`);
``random`` and ``PCA`` are RECT's two baselines at its budget of kept entries (its ablation)."""

from kelib.regularizers.base import Regularizer
from kelib.regularizers.d4s import D4S, D4SParams
from kelib.regularizers.pca import PCA, PCAParams, pca_rank, pca_reduce
from kelib.regularizers.prune import PRUNE, PRUNEParams, restrain
from kelib.regularizers.random_mask import RandomMask, RandomMaskParams, random_mask
from kelib.regularizers.rect import RECT, RECTParams, kept_entries, rect

REGULARIZERS = {"none": (Regularizer, None), "RECT": (RECT, RECTParams), "PRUNE": (PRUNE, PRUNEParams), "D4S": (D4S, D4SParams),
                "random": (RandomMask, RandomMaskParams), "PCA": (PCA, PCAParams)}


def make_regularizer(name: str, params: dict | None = None, editor_hparams=None) -> Regularizer:
    """A fresh regularizer by name, its parameters checked like any config; parameters that default
    to the editor's (D4S's λ) are taken from ``editor_hparams`` when given."""
    from kelib.config import from_dict

    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; kelib has {sorted(REGULARIZERS)}")
    cls, params_cls = REGULARIZERS[name]
    if params_cls is None:
        if params:
            raise ValueError(f"regularizer {name!r} takes no parameters, got {sorted(params)}")
        return cls()
    checked = from_dict(params_cls, params or {}, where=f"regularizer {name}")
    if editor_hparams is not None and hasattr(checked, "for_editor"):
        checked = checked.for_editor(editor_hparams)
    return cls(checked)


__all__ = ["Regularizer", "RECT", "RECTParams", "PRUNE", "PRUNEParams", "D4S", "D4SParams", "make_regularizer", "rect", "restrain",
           "RandomMask", "RandomMaskParams", "random_mask", "kept_entries", "PCA", "PCAParams", "pca_rank", "pca_reduce"]
