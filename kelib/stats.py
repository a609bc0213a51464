"""Key second moments C = E[k kᵀ] of an edited layer over a text corpus, cached on disk.

ROME and MEMIT weight their updates by the uncentered second moment of the keys (the MLP hidden after
the nonlinearity, ``d_in``-dimensional) over generic text: ROME's ``u = C⁻¹ k``, MEMIT's
``ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹``, AlphaEdit's null space of C0. Every non-padding token counts.

Statistics are keyed by (model name, the weights' identity fingerprint, layer, module, corpus and its
version, number of tokens, dtype) and stored as ``{sum, count}`` so a run that is interrupted resumes
from its last checkpoint: two local models in folders of the same name never share a C. Offline, the
bundled WikiText-2 test split is the corpus; online users can ask for Wikipedia (ROME's choice); a
folder of text files (``*.txt``, ``*.txt.gz``, read in name order, a paragraph per blank-line block)
is a corpus too, keyed by its files' contents.

Embedded models look facts up at the prompt's last token, not the subject's. Keys there are a small
population in generic text, so a C0 over every token barely sees the direction that all prompts of
one template share, and C⁻¹k leaks an edit to the neighbours that share it. ``lookup_share`` ρ mixes
in the second moment of the keys at the lookup positions themselves (corpus ``embedded_prompts``):
C0 = (1 − ρ) C_text + ρ C_lookup. ρ = 0 (the default, and the papers' setting) is plain C_text.

Both embedded corpora read only the facts of the world's *stats* split (``kelib.embedded.world``):
as Wikipedia for GPT-2 XL, C0 never holds the prompts that are edited, probed or counted as an
unedited ability, so an editor cannot protect exactly the keys it is then scored on.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from kelib.io import atomic_path, file_lock, sha256_file, stable_hash
from kelib.models import capture, device_of, forward_through, identity_fingerprint, module_name, same_device
from kelib.paths import bundled, cache_dir

log = logging.getLogger(__name__)

CORPORA = {
    "wikitext2": "WikiText-2 raw test split, bundled (offline default)",
    "embedded_world": "an embedded model's own training text: its stats-split fact statements and WikiText paragraphs",
    "embedded_prompts": "an embedded model's trained prompts of its stats-split facts, each counted at its last token",
    "wikipedia": "wikimedia/wikipedia 20231101.en via datasets (online; ROME used the 2020 dump)",
}
CORPUS_VERSIONS = {
    "wikitext2": "wikitext-2-raw-v1/test",
    "wikipedia": "wikimedia/wikipedia/20231101.en",
    # the model id (with its recipe hash) is part of the key; v2: stats-split facts only
    "embedded_world": "embedded-world-v2",
    "embedded_prompts": "embedded-prompts-v2",
}
LAST_TOKEN_CORPORA = {"embedded_prompts"}  # one key per text: where the model looks the fact up


@dataclass(frozen=True)
class StatsSpec:
    """Which text and how much of it: the part of the cache key that is not the model."""

    corpus: str = "wikitext2"
    n_tokens: int | None = 100_000  # key vectors accumulated per layer; None: the whole corpus
    max_length: int = 128  # tokens per text window
    n_texts: int | None = None  # ROME/MEMIT's count: this many texts, each cut to its first max_length
    batch_size: int = 16
    dtype: str = "float32"  # accumulation precision; float64 for very small models is cheap

    def __post_init__(self):
        check_corpus(self.corpus)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"stats dtype must be float32 or float64, got {self.dtype!r}")
        if self.n_texts is not None and self.n_tokens is not None:
            raise ValueError("count texts (n_texts) or tokens (n_tokens), not both: set n_tokens=None")


def check_corpus(corpus: str) -> str:
    """``corpus`` if it names a known corpus or a folder holding text files, else a clear ValueError."""
    if corpus in CORPORA:
        return corpus
    folder = Path(corpus).expanduser()
    if folder.is_dir():
        if not _folder_files(folder):
            raise ValueError(f"corpus folder {folder} holds no text files (*.txt, *.txt.gz)")
        return corpus
    raise ValueError(f"unknown corpus {corpus!r}: choose from {sorted(CORPORA)} or give a folder of text "
                     "files (*.txt, *.txt.gz)")


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))


_FOLDER_VERSIONS: dict[tuple, str] = {}


def corpus_version(corpus: str) -> str:
    """The cache-key form of a corpus: its version for a known one; for a folder, a hash of its files'
    names and contents (computed once per process while no file changes)."""
    if corpus in CORPORA:
        return CORPUS_VERSIONS[corpus]
    folder = Path(corpus).expanduser().resolve()
    files = _folder_files(folder)
    stamp = (str(folder), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _FOLDER_VERSIONS:
        _FOLDER_VERSIONS[stamp] = "folder-" + stable_hash(
            [(str(p.relative_to(folder)), sha256_file(p)) for p in files])
    return _FOLDER_VERSIONS[stamp]


@dataclass(frozen=True, kw_only=True)
class SecondMomentSettings:
    """The hyperparameters that choose an editor's C0 (mixed into its hyperparameter dataclass)."""

    mom2_dataset: str = "wikitext2"  # a key of CORPORA, or a folder of text files
    mom2_n_tokens: int = 100_000  # key vectors (tokens) in C; ROME counted 100k Wikipedia articles
    # ROME/MEMIT's own count (their mom2_n_samples): this many texts, each cut to its first
    # mom2_max_length tokens (the model's context: 1,024 GPT-2, 2,048 GPT-J); replaces mom2_n_tokens
    mom2_n_samples: int | None = None
    mom2_max_length: int = 128  # tokens per text window
    mom2_dtype: str = "float32"
    mom2_lookup_share: float = 0.0  # ρ: share of C0 from keys at the lookup positions (embedded models)


def model_id(model) -> str:
    """Name used in cache keys: the hub id or the local folder name (embedded models carry a hash).

    A model built in memory (no name) is named by a fingerprint of its weights, so two random models
    never share statistics.
    """
    path = str(getattr(model.config, "_name_or_path", "") or "")
    if not path:
        sums = [float(p.detach().double().sum()) for p in model.parameters()]
        return f"unnamed-{type(model).__name__}-{stable_hash(sums)}"
    return Path(path).name if Path(path).exists() else path.replace("/", "_")


def stats_path(model, layer: int, spec: StatsSpec, part: str = "mlp_out") -> Path:
    key = {
        "model": model_id(model),
        "weights": identity_fingerprint(model),
        "module": module_name(model, layer, part),
        "corpus": corpus_version(spec.corpus),
        "n_tokens": spec.n_tokens,
        "max_length": spec.max_length,
        "dtype": spec.dtype,
    }
    if spec.n_texts is not None:  # absent otherwise, so caches written before it keep their names
        key["n_texts"] = spec.n_texts
    return cache_dir("stats", model_id(model)) / f"layer{layer}_{part}_{stable_hash(key)}.pt"


def second_moments(
    model, tok, layers: Sequence[int], spec: StatsSpec = StatsSpec(), part: str = "mlp_out", progress: bool = True
) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (``d_in x d_in``, float32 on the CPU) for each layer, from cache or computed.

    Layers missing from the cache are computed together in one pass over the corpus, by one process
    at a time (others wait, then read what it wrote).
    """
    with file_lock(stats_path(model, layers[0], spec, part).parent / ".lock"):
        return _second_moments(model, tok, layers, spec, part, progress)


def _second_moments(model, tok, layers, spec: StatsSpec, part: str, progress: bool) -> dict[int, torch.Tensor]:
    result: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = stats_path(model, layer, spec, part)
        if path.exists():
            saved = torch.load(path)
            result[layer] = (saved["sum"] / saved["count"]).float()
        else:
            missing.append(layer)
    if missing:
        result.update(_compute(model, tok, missing, spec, part, progress))
    return {layer: result[layer] for layer in layers}


def _compute(model, tok, layers, spec: StatsSpec, part: str, progress: bool) -> dict[int, torch.Tensor]:
    dtype = getattr(torch, spec.dtype)
    partial = {layer: stats_path(model, layer, spec, part).with_suffix(".partial.pt") for layer in layers}
    device = device_of(model)
    # K Kᵀ accumulates where the keys are (on a GPU: no d_in² copy per batch, no CPU additions); the
    # sums reach the CPU once per checkpoint and once at the end
    state = _resume(partial, layers, device)
    limit = float("inf") if spec.n_tokens is None else spec.n_tokens
    last_only = spec.corpus in LAST_TOKEN_CORPORA
    bar = tqdm(total=spec.n_tokens, initial=state["count"], desc=f"key statistics {layers}", unit="tok",
               disable=not progress)
    windows = _windows(tok, spec, model)
    for _ in range(state["batches"]):  # skip what the partial file already holds
        next(windows, None)
    while state["count"] < limit:
        batch = next(windows, None)
        if batch is None:
            if spec.n_tokens is not None:
                log.warning("corpus %s exhausted after %d tokens (asked for %d)", spec.corpus, state["count"],
                            spec.n_tokens)
            break
        ids, mask = (t.to(device) for t in batch)
        with torch.no_grad(), capture(model, layers, part) as rec:
            forward_through(model, ids, mask, max(layers))
        keep = mask.bool()
        if last_only:  # right-padded: each row's last real token
            keep = torch.zeros_like(keep).scatter_(1, mask.sum(1, keepdim=True) - 1, True)
        for layer in layers:
            keys = rec[layer]["key"][keep].to(dtype)
            product = keys.T @ keys
            if isinstance(state["sum"][layer], torch.Tensor):
                same_device(state["sum"][layer], product, what=f"the key statistics of layer {layer} and its keys")
            state["sum"][layer] += product
        n = int(keep.sum())
        state["count"] += n
        state["batches"] += 1
        bar.update(n)
        if state["batches"] % 20 == 0:
            _checkpoint(partial, state)
    bar.close()
    out = {}
    for layer in layers:
        final = stats_path(model, layer, spec, part)
        total = _on_cpu(state["sum"][layer])
        with atomic_path(final) as tmp:
            torch.save({"sum": total, "count": state["count"]}, tmp)
        partial[layer].unlink(missing_ok=True)
        out[layer] = (total / state["count"]).float()
    return out


def _on_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _resume(partial: dict[int, Path], layers, device="cpu") -> dict:
    states = [torch.load(p) for p in partial.values() if p.exists()]
    if len(states) == len(layers) and len({(s["count"], s["batches"]) for s in states}) == 1:
        log.info("resuming key statistics from %d tokens", states[0]["count"])
        return {"sum": {l: torch.load(partial[l], map_location=device)["sum"] for l in layers},
                **{k: states[0][k] for k in ("count", "batches")}}
    return {"sum": {l: 0 for l in layers}, "count": 0, "batches": 0}


def _checkpoint(partial: dict[int, Path], state: dict) -> None:
    for layer, path in partial.items():
        with atomic_path(path) as tmp:
            torch.save({"sum": _on_cpu(state["sum"][layer]), "count": state["count"], "batches": state["batches"]},
                       tmp)


def _windows(tok, spec: StatsSpec, model=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from kelib.tokens import pad_batch

    batch: list[list[int]] = []
    shortest = 1 if spec.corpus in LAST_TOKEN_CORPORA else 8
    for n, text in enumerate(_texts(spec.corpus, model)):
        if spec.n_texts is not None and n == spec.n_texts:
            break
        ids = tok(text)["input_ids"]
        # ROME/MEMIT's layer_stats truncates each text to its first window; kelib's token count reads them all
        stop = spec.max_length if spec.n_texts is not None else len(ids)
        for lo in range(0, min(len(ids), stop), spec.max_length):
            window = ids[lo : lo + spec.max_length]
            if len(window) >= shortest:
                batch.append(window)
            if len(batch) == spec.batch_size:
                yield pad_batch(batch, tok.pad_token_id)
                batch = []
    if batch:
        yield pad_batch(batch, tok.pad_token_id)


def _texts(corpus: str, model=None) -> Iterator[str]:
    if corpus == "embedded_world":
        yield from _embedded_world_texts(model)
    elif corpus == "embedded_prompts":
        yield from _embedded_prompts(model)
    elif corpus not in CORPORA:  # a folder (checked by StatsSpec)
        for path in _folder_files(Path(corpus).expanduser()):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
                for para in handle.read().split("\n\n"):
                    para = " ".join(para.split())
                    if para:
                        yield para
    elif corpus == "wikitext2":
        raw = gzip.open(bundled("corpus", "wiki.test.raw.gz"), "rt", encoding="utf-8").read()
        for para in raw.split("\n"):
            para = para.strip()
            if para and not para.startswith("="):
                yield para
    else:
        from datasets import load_dataset

        try:
            stream = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
            for record in stream:
                yield record["text"]
        except Exception as err:  # network errors come in many types
            raise RuntimeError(
                "could not stream Wikipedia (wikimedia/wikipedia 20231101.en); offline, set the notebook "
                "parameter stats_corpus to wikitext2 (bundled) or to a folder of text files (from the command "
                "line: kelib reproduce --stats-corpus wikitext2), or use StatsSpec(corpus='wikitext2')"
            ) from err


def _embedded(model, corpus: str, read):
    """``read(model folder)`` for an embedded model; a clear error for any other model."""
    try:
        return read(str(getattr(model.config, "_name_or_path", "")))
    except FileNotFoundError as err:
        raise ValueError(
            f"corpus {corpus!r} needs an embedded model loaded from its folder (kelib-default, kelib-micro): {err}"
        ) from err


def _embedded_world_texts(model) -> Iterator[str]:
    """What an embedded model was trained on, shuffled: the analogue of Wikipedia for GPT-2 XL.

    C must describe the keys the model meets in its own text; an embedded model trained mostly on
    short fact statements sees few of them in WikiText, and a C⁻¹ from WikiText alone cannot tell
    one subject's key from another's at the same template (edits then leak to neighbours). Of the
    fact statements, only the stats split's (see the module docstring)."""
    import random

    from kelib.embedded.store import recipe_of, world_of
    from kelib.embedded.train import split_paragraphs
    from kelib.embedded.world import training_statements

    def read(path):
        world = world_of(path)
        stats = world.facts_in("stats")
        statements = [s for f in stats for s in training_statements(f, world.relations[f.relation_id])]
        return statements + split_paragraphs(recipe_of(path))[0]

    texts = _embedded(model, "embedded_world", read)
    random.Random(0).shuffle(texts)
    yield from texts


def _embedded_prompts(model) -> Iterator[str]:
    """Every trained prompt (a statement without its object) of an embedded model's *stats* facts:
    C_lookup never sees an eval case's prompt, paraphrase or neighbour, a tune fact or an unedited one."""
    from kelib.embedded.store import world_of
    from kelib.embedded.world import trained_prompts

    world = _embedded(model, "embedded_prompts", world_of)
    for fact in world.facts_in("stats"):
        yield from trained_prompts(fact, world.relations[fact.relation_id])


class KeyStatistics:
    """C0 per layer for one model, computed or loaded once and kept in memory.

    Editors ask ``stats[layer]``; the spec is fixed for the object's lifetime (one run, one corpus).
    With ``lookup_share`` ρ > 0, ``stats[layer]`` is (1 − ρ) C_text + ρ C_lookup, C_lookup from the
    keys at the embedded model's lookup positions (see the module docstring).
    """

    def __init__(self, model, tok, spec: StatsSpec = StatsSpec(), part: str = "mlp_out", progress: bool = True,
                 lookup_share: float = 0.0):
        if not 0.0 <= lookup_share <= 1.0:
            raise ValueError(f"lookup_share must be in [0, 1], got {lookup_share}")
        self.model, self.tok, self.spec, self.part, self.progress = model, tok, spec, part, progress
        identity_fingerprint(model)  # the cache key is the model this run starts from, not its edits
        self.lookup_share = lookup_share
        self._cache: dict[int, torch.Tensor] = {}
        self._siblings: dict[str, KeyStatistics] = {}
        self._lookup_spec = StatsSpec(corpus="embedded_prompts", n_tokens=None, dtype=spec.dtype)

    def prefetch(self, layers: Sequence[int]) -> None:
        """Compute all missing layers in one pass over the corpus (two with a lookup share)."""
        missing = [layer for layer in layers if layer not in self._cache]
        if not missing:
            return
        found = second_moments(self.model, self.tok, missing, self.spec, self.part, self.progress)
        if self.lookup_share:
            rho = self.lookup_share
            lookup = second_moments(self.model, self.tok, missing, self._lookup_spec, self.part, self.progress)
            found = {layer: (1 - rho) * found[layer] + rho * lookup[layer] for layer in missing}
        self._cache.update(found)

    def __getitem__(self, layer: int) -> torch.Tensor:
        self.prefetch([layer])
        return self._cache[layer]

    def for_part(self, part: str) -> "KeyStatistics":
        """The same corpus's statistics of another projection's keys (PMET's attention output)."""
        if part == self.part:
            return self
        if part not in self._siblings:
            self._siblings[part] = KeyStatistics(self.model, self.tok, self.spec, part, self.progress,
                                                 self.lookup_share)
        return self._siblings[part]


def neighbour_key_share(model, tok, cases, layer: int, c0: torch.Tensor) -> torch.Tensor:
    """Per case, u·k_nb / u·k with u = C0⁻¹k: the share of a rank-one edit at the case's key k that
    reaches its first neighbourhood prompt's key k_nb. Keys at the prompt's last token, where the
    embedded models look facts up."""
    from dataclasses import replace

    from kelib.editors.context import keys_at

    # keys at the prompt's last token never use the subject; any word of the prompt passes the check
    neighbours = [replace(c, prompt=c.neighborhood_prompts[0], subject=c.neighborhood_prompts[0].split()[0])
                  for c in cases]
    k = keys_at(model, tok, cases, ["{}"], [layer], "prompt_last")[layer][0].double()
    k_nb = keys_at(model, tok, neighbours, ["{}"], [layer], "prompt_last")[layer][0].double()
    u = torch.linalg.solve(c0.double(), k.T).T
    return (u * k_nb).sum(1) / (u * k).sum(1)


def stats_spec_for(hparams) -> StatsSpec:
    """The :class:`StatsSpec` of an editor's :class:`SecondMomentSettings` (the defaults without them)."""
    settings = hparams if isinstance(hparams, SecondMomentSettings) else SecondMomentSettings()
    texts = settings.mom2_n_samples  # ROME/MEMIT count texts, each cut to its first window
    return StatsSpec(corpus=settings.mom2_dataset, n_tokens=None if texts else settings.mom2_n_tokens,
                     n_texts=texts, max_length=settings.mom2_max_length, dtype=settings.mom2_dtype)


def statistics_for(model, tok, hparams, progress: bool = True) -> KeyStatistics:
    """The :class:`KeyStatistics` an editor's :class:`SecondMomentSettings` ask for; the defaults for
    editors without them (FT)."""
    settings = hparams if isinstance(hparams, SecondMomentSettings) else SecondMomentSettings()
    return KeyStatistics(model, tok, stats_spec_for(hparams), progress=progress,
                         lookup_share=settings.mom2_lookup_share)
