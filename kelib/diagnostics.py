"""Weight diagnostics of an edited matrix: the quantities the papers track as edits accumulate.

D4S tracks the L1 norm of edited layers; PRUNE the condition number κ(W) = σ_max / σ_min, with σ_min
the smallest *non-zero* singular value of the rectangular W (the min(d_out, d_in)-th one, unless it
is numerically zero); RECT the relative change |ΔW| / |W|.
"""

from __future__ import annotations

import torch


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values in descending order (float64 for small matrices, float32 otherwise)."""
    dtype = torch.float64 if matrix.numel() <= 4_000_000 else torch.float32
    return torch.linalg.svdvals(matrix.detach().to(dtype))


def smallest_nonzero(sigma: torch.Tensor, shape: tuple[int, int]) -> float:
    """Smallest singular value above numerical zero (``σ_max · max(shape) · eps``)."""
    tol = sigma[0] * max(shape) * torch.finfo(sigma.dtype).eps
    nonzero = sigma[sigma > tol]
    return float(nonzero[-1]) if len(nonzero) else 0.0


def weight_diagnostics(weight: torch.Tensor, original: torch.Tensor | None = None) -> dict[str, float]:
    """Norms and spectrum of W (``d_out x d_in``), and of ΔW = W - W_0 when ``original`` is given.

    Keys: l1, l1_per_element, frobenius, sigma_max, sigma_min, condition_number, and with W_0:
    delta_l1, delta_frobenius, delta_sigma_max, relative_change_mean.
    """
    w = weight.detach().float()
    sigma = singular_values(w)
    sigma_min = smallest_nonzero(sigma, tuple(w.shape))
    out = {
        "l1": float(w.abs().sum()),
        "l1_per_element": float(w.abs().mean()),
        "frobenius": float(torch.linalg.norm(w)),
        "sigma_max": float(sigma[0]),
        "sigma_min": sigma_min,
        "condition_number": float(sigma[0]) / sigma_min if sigma_min > 0 else float("inf"),
    }
    if original is not None:
        delta = w - original.detach().float().to(w.device)
        out["delta_l1"] = float(delta.abs().sum())
        out["delta_frobenius"] = float(torch.linalg.norm(delta))
        out["delta_sigma_max"] = float(singular_values(delta)[0]) if out["delta_frobenius"] > 0 else 0.0
        out["relative_change_mean"] = float(relative_change(delta, original).mean())
    return out


def relative_change(delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Element-wise |ΔW| / |W| (RECT's δ). Entries where W = 0 get |ΔW| / eps, so any change there
    ranks as large rather than dividing by zero."""
    return delta.abs().float() / weight.abs().float().clamp_min(eps).to(delta.device)
