"""Model layer: addressing the edited projection per family, weight orientation, key capture."""

import pytest
import torch

from kelib import models
from kelib.models import ModelError

EXPECTED_MODULE = {
    "gpt2": "transformer.h.1.mlp.c_proj",
    "gptj": "transformer.h.1.mlp.fc_out",
    "llama": "model.layers.1.mlp.down_proj",
}


def test_module_names_per_family(tiny_model):
    model, _ = tiny_model
    family = model.config.model_type
    assert models.module_name(model, 1) == EXPECTED_MODULE[family]
    assert models.n_layers(model) == 3
    assert models.module_name(model, 2, "block").endswith(".2")


def test_weight_is_d_out_by_d_in_regardless_of_storage(tiny_model):
    model, _ = tiny_model
    d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    d_out, d_in = models.weight_shape(model, 0)
    assert d_out == d_model
    assert d_in > d_model  # the MLP hidden is wider than the residual stream in all three configs
    stored = models.edited_module(model, 0).weight
    if model.config.model_type == "gpt2":  # Conv1D keeps W transposed
        assert tuple(stored.shape) == (d_in, d_out)
    else:
        assert tuple(stored.shape) == (d_out, d_in)


def test_set_and_add_weight_round_trip(tiny_model):
    model, _ = tiny_model
    original = models.get_weight(model, 1).clone()
    delta = torch.randn_like(original)
    models.add_to_weight(model, 1, delta)
    assert torch.allclose(models.get_weight(model, 1), original + delta, atol=1e-6)
    models.set_weight(model, 1, original)
    assert torch.equal(models.get_weight(model, 1), original)
    with pytest.raises(ModelError, match="d_out x d_in"):
        models.set_weight(model, 1, original.T)


def test_captured_key_and_value_match_a_manual_forward(tiny_model):
    """The value is W k (+ b): the captured key pushed through the module gives the captured value."""
    model, tok = tiny_model
    ids = torch.tensor([tok("The mother tongue of Danielle Darrieux is")["input_ids"]])
    found = models.keys_and_values(model, ids, None, positions=[ids.shape[1] - 1], layers=[0, 2])
    for layer, (k, v) in found.items():
        module = models.edited_module(model, layer)
        assert torch.allclose(module(k), v, atol=1e-5)
        w = models.get_weight(model, layer)
        bias = getattr(module, "bias", None)
        manual = k @ w.T + (bias if bias is not None else 0)
        assert torch.allclose(manual, v, atol=1e-5)


def test_key_capture_reads_the_requested_position(tiny_gpt2):
    model, tok = tiny_gpt2
    ids = torch.tensor([tok("Toko Yasuda plays the guitar.")["input_ids"]] * 2)
    with models.capture(model, [1]) as rec:
        model(input_ids=ids)
    full_keys = rec[1]["key"]
    found = models.keys_and_values(model, ids, None, positions=[1, 3], layers=[1])[1][0]
    assert torch.allclose(found[0], full_keys[0, 1])
    assert torch.allclose(found[1], full_keys[1, 3])


def test_patch_output_changes_the_forward_and_is_removed(tiny_gpt2):
    model, tok = tiny_gpt2
    ids = torch.tensor([tok("hello world")["input_ids"]])
    before = model(input_ids=ids).logits
    with models.patch_output(model, models.module_name(model, 0), lambda h: h + 1.0):
        patched = model(input_ids=ids).logits
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, patched)
    assert torch.equal(before, after)


def test_out_of_range_layer_and_unknown_architecture(tiny_gpt2):
    model, _ = tiny_gpt2
    with pytest.raises(ModelError, match="layers 0..2"):
        models.module_name(model, 3)
    with pytest.raises(ModelError, match="layers 0..2"):
        models.get_weight(model, -1)

    class Strange(torch.nn.Module):
        class config:
            model_type = "t5"

    with pytest.raises(ModelError, match="unknown architecture 't5'"):
        models.architecture(Strange())


def test_loading_an_unknown_model_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="neither a local directory nor reachable"):
        models.load_model("no-such-org/no-such-model-kelib")
    with pytest.raises(ModelError, match="unknown dtype"):
        models.load_model(str(tmp_path), dtype="int3")


def test_load_model_from_a_local_path(tmp_path, tiny_gpt2):
    model, tok = tiny_gpt2
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path))
    assert not loaded.training
    assert loaded_tok.pad_token is not None
    assert torch.equal(models.get_weight(loaded, 2), models.get_weight(model, 2))


def test_weights_fingerprint_does_not_depend_on_the_thread_count():
    """A worker process running with one thread (kelib.executors) must name the model as its parent
    with two does, or it would compute runs the parent never finds."""
    import torch

    from kelib.models import weights_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1500, 1500), torch.nn.Linear(1500, 700))  # blocks of 2^20 and less
    threads = torch.get_num_threads()
    try:
        found = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            found.add(weights_fingerprint(model))
    finally:
        torch.set_num_threads(threads)
    assert len(found) == 1
    with torch.no_grad():
        model[0].weight[3, 7] += 1e-6
    assert weights_fingerprint(model) not in found
