"""Where kelib keeps things: bundled data inside the package, caches in one user directory."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "bundled"
REPO_DIR = PACKAGE_DIR.parent


def cache_dir(*parts: str) -> Path:
    """Root of kelib's on-disk caches (models, statistics, evaluations), created on demand.

    ``KELIB_CACHE`` overrides the default ``~/.cache/kelib`` (tests point it at a temporary folder).
    """
    root = Path(os.environ.get("KELIB_CACHE", Path.home() / ".cache" / "kelib")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled(*parts: str) -> Path:
    """Path of a file shipped with kelib (see ``kelib/bundled/PROVENANCE.md``); errors if missing."""
    path = BUNDLED_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"bundled file {path} is missing: the kelib checkout is incomplete "
            f"(expected under {BUNDLED_DIR})"
        )
    return path
