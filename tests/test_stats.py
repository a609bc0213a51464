"""Key second moments: correctness against a direct computation, caching, resumption."""

import dataclasses

import pytest
import torch

from kelib import stats
from kelib.models import capture
from kelib.stats import KeyStatistics, StatsSpec

SPEC = StatsSpec(n_tokens=3000, max_length=32, batch_size=8)


def test_second_moment_equals_mean_outer_product(tiny_gpt2):
    model, tok = tiny_gpt2
    spec = StatsSpec(n_tokens=200, max_length=16, batch_size=4, dtype="float64")
    c = stats.second_moments(model, tok, [1], spec, progress=False)[1]
    # recompute directly over the same windows
    keys = []
    count = 0
    for ids, mask in stats._windows(tok, spec):
        with torch.no_grad(), capture(model, [1]) as rec:
            model(input_ids=ids, attention_mask=mask)
        keys.append(rec[1]["key"][mask.bool()].double())
        count += int(mask.sum())
        if count >= spec.n_tokens:
            break
    k = torch.cat(keys)
    assert torch.allclose(c.double(), (k.T @ k / len(k)), rtol=1e-5, atol=1e-7)
    assert torch.allclose(c, c.T)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6  # positive semi-definite


def test_second_call_reads_the_cache(tiny_gpt2, monkeypatch):
    model, tok = tiny_gpt2
    first = stats.second_moments(model, tok, [0, 2], SPEC, progress=False)
    assert stats.stats_path(model, 0, SPEC).exists()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(stats, "_compute", fail)
    again = stats.second_moments(model, tok, [0, 2], SPEC, progress=False)
    assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])


def test_a_changed_key_recomputes(tiny_gpt2, monkeypatch, tmp_path):
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))  # a cache of its own: a kept test cache must not pass for "absent"
    model, tok = tiny_gpt2
    stats.second_moments(model, tok, [1], SPEC, progress=False)
    other = StatsSpec(n_tokens=SPEC.n_tokens + 500, max_length=32, batch_size=8)
    assert stats.stats_path(model, 1, other) != stats.stats_path(model, 1, SPEC)
    assert not stats.stats_path(model, 1, other).exists()
    stats.second_moments(model, tok, [1], other, progress=False)
    assert stats.stats_path(model, 1, other).exists()
    # a different model (other weights, same architecture) never shares statistics
    from tests.conftest import make_tiny_model

    other_model = make_tiny_model("gpt2", len(tok), seed=1)
    assert stats.stats_path(other_model, 1, SPEC) != stats.stats_path(model, 1, SPEC)


def test_interrupted_run_resumes_from_its_checkpoint(tiny_gpt2, monkeypatch):
    model, tok = tiny_gpt2
    spec = StatsSpec(n_tokens=6000, max_length=16, batch_size=4)
    reference = stats.second_moments(model, tok, [2], spec, progress=False)[2]
    stats.stats_path(model, 2, spec).unlink()

    calls = {"n": 0}
    real_capture = stats.capture

    def crashing_capture(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 45:  # after two checkpoints (every 20 batches)
            raise KeyboardInterrupt
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(stats, "capture", crashing_capture)
    with pytest.raises(KeyboardInterrupt):
        stats.second_moments(model, tok, [2], spec, progress=False)
    partial = stats.stats_path(model, 2, spec).with_suffix(".partial.pt")
    assert partial.exists() and not stats.stats_path(model, 2, spec).exists()
    assert torch.load(partial)["batches"] == 40

    monkeypatch.setattr(stats, "capture", real_capture)
    resumed = stats.second_moments(model, tok, [2], spec, progress=False)[2]
    assert torch.allclose(resumed, reference, rtol=1e-5, atol=1e-6)
    assert not partial.exists()


def test_key_statistics_object_and_bad_spec(tiny_gpt2):
    model, tok = tiny_gpt2
    provider = KeyStatistics(model, tok, SPEC, progress=False)
    assert provider[1].shape == (4 * 32, 4 * 32)
    with pytest.raises(ValueError, match="unknown corpus"):
        StatsSpec(corpus="reddit")


def test_lookup_keys_are_one_per_trained_prompt_at_its_last_token(micro, micro_dir):
    """C_lookup = mean of k kᵀ over the keys at each trained prompt's last token of the stats facts, nothing else."""
    from dataclasses import replace

    from kelib.editors.context import keys_at
    from kelib.embedded import world_cases
    from kelib.embedded.build import world_of
    from kelib.embedded.world import trained_prompts

    model, tok, _ = micro
    spec = StatsSpec(corpus="embedded_prompts", n_tokens=None, dtype="float64")
    c = stats.second_moments(model, tok, [0], spec, progress=False)[0]
    saved = torch.load(stats.stats_path(model, 0, spec))
    world = world_of(micro_dir)
    prompts = [p for f in world.facts_in("stats") for p in trained_prompts(f, world.relations[f.relation_id])]
    assert saved["count"] == len(prompts)

    case = world_cases("micro")[0]
    as_cases = [replace(case, prompt=p, subject=p.split()[0]) for p in prompts]
    keys = torch.cat([keys_at(model, tok, as_cases[i:i + 256], ["{}"], [0], "prompt_last")[0][0]
                      for i in range(0, len(as_cases), 256)]).double()
    assert torch.allclose(c.double(), keys.T @ keys / len(keys), rtol=1e-4, atol=1e-6)


def test_lookup_share_mixes_the_two_second_moments(micro):
    model, tok, _ = micro
    spec = StatsSpec(corpus="embedded_world", n_tokens=2000)
    text = stats.second_moments(model, tok, [1], spec, progress=False)[1]
    lookup = stats.second_moments(model, tok, [1], StatsSpec(corpus="embedded_prompts", n_tokens=None), progress=False)[1]
    assert not torch.allclose(text, lookup, rtol=0.1)
    mixed = KeyStatistics(model, tok, spec, progress=False, lookup_share=0.75)
    assert torch.allclose(mixed[1], 0.25 * text + 0.75 * lookup)
    assert torch.equal(KeyStatistics(model, tok, spec, progress=False)[1], text)
    attn = mixed.for_part("attn_out")
    assert attn.lookup_share == 0.75 and attn[1].shape == (model.config.n_embd, model.config.n_embd)
    with pytest.raises(ValueError, match="lookup_share"):
        KeyStatistics(model, tok, spec, lookup_share=1.5)


def test_lookup_keys_need_an_embedded_model(tiny_gpt2):
    model, tok = tiny_gpt2
    with pytest.raises(ValueError, match="needs an embedded model"):
        stats.second_moments(model, tok, [0], StatsSpec(corpus="embedded_prompts", n_tokens=None), progress=False)


def test_lookup_share_shrinks_the_neighbour_leak(micro):
    """Why the embedded hyperparameters set it: with C_lookup mixed in, a neighbour prompt of the same
    relation shares less of the edit's u·k (u = C⁻¹k̄) than with C from text alone."""
    model, tok, cases = micro
    spec = StatsSpec(corpus="embedded_world", n_tokens=20_000)

    def median_leak(share):
        c = KeyStatistics(model, tok, spec, progress=False, lookup_share=share)[1]
        return float(stats.neighbour_key_share(model, tok, cases[:40], 1, c).median())

    assert median_leak(0.97) < 0.5 * median_leak(0.0)
    # the share of a case's own key is 1 by construction
    own = [dataclasses.replace(c, neighborhood_prompts=(c.prompt,)) for c in cases[:5]]
    c = KeyStatistics(model, tok, spec, progress=False)[1]
    assert torch.allclose(stats.neighbour_key_share(model, tok, own, 1, c), torch.ones(5, dtype=torch.float64))


def test_sums_stay_on_the_model_device_and_match_the_per_batch_cpu_sum(tiny_gpt2, monkeypatch, tmp_path):
    """Issue #21: K Kᵀ accumulates where the keys are and is copied off once per checkpoint, not per
    batch; on the CPU the sum is bit-identical to adding each batch's K Kᵀ in turn (the old code)."""
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))
    model, tok = tiny_gpt2
    spec = StatsSpec(n_tokens=1500, max_length=16, batch_size=4, dtype="float64")  # about 25 batches
    d_in = 4 * model.config.n_embd
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        if tuple(self.shape) == (d_in, d_in):
            copies.append(self.dtype)
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    c = stats.second_moments(model, tok, [0, 2], spec, progress=False)
    monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    saved = {layer: torch.load(stats.stats_path(model, layer, spec)) for layer in (0, 2)}
    n_batches = 0
    reference = {0: 0, 2: 0}
    count = 0
    for ids, mask in stats._windows(tok, spec):
        with torch.no_grad(), capture(model, [0, 2]) as rec:
            model(input_ids=ids, attention_mask=mask)
        for layer in (0, 2):
            keys = rec[layer]["key"][mask.bool()].to(torch.float64)
            reference[layer] = reference[layer] + keys.T @ keys
        count += int(mask.sum())
        n_batches += 1
        if count >= spec.n_tokens:
            break
    assert n_batches > 20 and saved[0]["count"] == count
    for layer in (0, 2):
        assert torch.equal(saved[layer]["sum"], reference[layer])  # bit for bit
        assert torch.equal(c[layer], (reference[layer] / count).float())
    # one checkpoint (after batch 20) and the final save, per layer: 4 copies for 2 layers, not 2 per batch
    assert len(copies) == 4, copies
