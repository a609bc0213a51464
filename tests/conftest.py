"""Shared fixtures: offline environment, a temporary kelib cache, tiny random models of each family.

``KELIB_TEST_DEVICE`` (default ``cpu``; e.g. ``cuda``) is the device the model-building fixtures
(``tiny_model``, ``tiny_gpt2``, ``micro``) put their models on, so the same tests exercise device
placement on an accelerator: ``KELIB_TEST_DEVICE=cuda pytest tests/``. On the CPU, the seams where
tensors meet are checked with ``kelib.models.same_device`` and the ``meta`` device stands in for a
second device (``tests/test_devices.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Any hub access in a test must fail at once, not hang or silently download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXTS = [
    "The mother tongue of Danielle Darrieux is French.",
    "Danielle Darrieux is a native speaker of French.",
    "The official religion of Edwin of Northumbria is Christianity.",
    "Michel Rocard is a native speaker of French.",
    "Toko Yasuda plays the guitar.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "What is the answer? The answer is yes. The movie was great. The movie was awful.",
] * 20


@pytest.fixture(scope="session", autouse=True)
def kelib_cache(tmp_path_factory) -> Path:
    """Point KELIB_CACHE at one folder per test session (or at KELIB_TEST_CACHE to reuse builds)."""
    root = os.environ.get("KELIB_TEST_CACHE") or str(tmp_path_factory.mktemp("kelib-cache"))
    os.environ["KELIB_CACHE"] = root
    os.environ.setdefault("HF_HOME", str(Path(root) / "hf"))
    return Path(root)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from kelib.embedded.tokenizer import train_bpe

    return train_bpe(TINY_TEXTS, vocab_size=400)


def kelib_test_device() -> str:
    """The device the model fixtures use: ``KELIB_TEST_DEVICE`` (default ``cpu``)."""
    return os.environ.get("KELIB_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def test_device():
    """``torch.device`` of ``KELIB_TEST_DEVICE``; the session is skipped with a reason when it is not there."""
    import torch

    device = torch.device(kelib_test_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("KELIB_TEST_DEVICE=cuda but no CUDA device is available")
    return device


def make_tiny_model(family: str, vocab_size: int, seed: int = 0, device: str | None = None):
    """A randomly initialised causal LM of ``family`` small enough to run in milliseconds, on ``device``
    (default: ``KELIB_TEST_DEVICE``; weights drawn on the CPU, so every device gets the same ones)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, LlamaConfig

    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, vocab_size=vocab_size)
    elif family == "gptj":
        config = GPTJConfig(
            n_layer=3, n_embd=32, n_head=2, rotary_dim=8, n_positions=128, vocab_size=vocab_size
        )
    elif family == "llama":
        config = LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            vocab_size=vocab_size,
        )
    else:
        raise ValueError(family)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config)
    return model.to(device or kelib_test_device()).eval().requires_grad_(False)


@pytest.fixture(params=["gpt2", "gptj", "llama"])
def tiny_model(request, tiny_tokenizer, test_device):
    """``(model, tokenizer)`` for each supported family, random weights, on the test device."""
    return make_tiny_model(request.param, len(tiny_tokenizer), device=test_device), tiny_tokenizer


@pytest.fixture
def tiny_gpt2(tiny_tokenizer, test_device):
    return make_tiny_model("gpt2", len(tiny_tokenizer), device=test_device), tiny_tokenizer


@pytest.fixture(scope="session")
def micro_dir(kelib_cache):
    """The micro embedded model, built once per test session (about a minute on 2 cores)."""
    from kelib.embedded import ensure_model

    return ensure_model("micro", progress=False)


@pytest.fixture(scope="session")
def micro(micro_dir, test_device):
    """``(model, tokenizer, world cases)`` of the micro model, loaded like any local model, on the test device."""
    from kelib.embedded import world_cases
    from kelib.models import load_model

    model, tok = load_model(str(micro_dir), device=test_device)
    return model, tok, world_cases("micro")


@pytest.fixture(scope="session")
def micro_stats(micro):
    """Key second moments of the micro model (WikiText-2, as its editor hyperparameters ask)."""
    from kelib.editors import load_hparams
    from kelib.stats import statistics_for

    model, tok, _ = micro
    return statistics_for(model, tok, load_hparams("MEMIT", "kelib-micro"), progress=False)


@pytest.fixture
def untouched(micro):
    """Fails the test if it leaves the micro model's weights changed."""
    import torch

    model = micro[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"weights left changed: {changed}"
