"""Tests for helpers/meta.py (chapter 01)."""

import copy

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import find_tied_parameters
from torch import nn

from helpers.meta import (
    count_parameters,
    functions_called,
    is_inside,
    parameter_bytes,
    parse_dtype,
    record_parameter_registrations,
    tensor_devices,
    tied_parameters,
)


class TiedLM(nn.Module):
    """A tiny language model whose output layer shares the embedding matrix."""

    def __init__(self, vocab: int = 50, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(hidden))


def test_counts_tied_weights_once_or_per_name():
    model = TiedLM()
    unique = 50 * 8 + 8 * 8 + 8
    assert count_parameters(model) == unique
    assert count_parameters(model, unique=False) == unique + 50 * 8
    assert parameter_bytes(model) == 4 * unique
    assert parameter_bytes(model.half(), unique=False) == 2 * (unique + 50 * 8)


def test_meta_model_reports_the_bytes_it_would_take():
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(1000, 1000) for _ in range(100)])
    assert count_parameters(model) == 100_100_000
    assert parameter_bytes(model) == 400_400_000  # fp32
    assert tensor_devices(model) == {"meta": 200}


def test_the_book_model_on_meta_costs_what_the_real_one_takes(book_model):
    model, _ = book_model
    assert count_parameters(model) == 134_515_008  # SmolLM2-135M's published count
    assert count_parameters(model, unique=False) == 134_515_008 + 49152 * 576  # lm_head is the embedding matrix
    assert tied_parameters(model) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert sorted(sorted(g) for g in find_tied_parameters(model)) == tied_parameters(model)
    with torch.device("meta"):
        empty = type(model)(copy.deepcopy(model.config))
    assert set(tensor_devices(empty)) == {"meta"} and tied_parameters(empty) == tied_parameters(model)
    # what the loaded model really holds: the bytes of each parameter's storage
    held = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert parameter_bytes(empty) == held == 538_060_032


def test_tied_parameters_agrees_with_accelerate():
    model = TiedLM()
    assert tied_parameters(model) == [["embed.weight", "head.weight"]]
    ours = sorted(sorted(g) for g in tied_parameters(model))
    theirs = sorted(sorted(g) for g in find_tied_parameters(model))
    assert ours == theirs
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    assert tied_parameters(model) == [] == find_tied_parameters(model)


def test_tensor_devices_sees_buffers_that_init_empty_weights_leaves_on_cpu():
    with init_empty_weights():
        model = TiedLM()
    # init_empty_weights re-creates every registered parameter, so `head.weight = embed.weight`
    # gets a copy: four separate meta parameters, no tie.
    assert tensor_devices(model) == {"cpu": 1, "meta": 4}
    assert tensor_devices(model, buffers=False) == {"meta": 4}
    assert tied_parameters(model) == []
    with torch.device("meta"):
        model = TiedLM()
    assert tensor_devices(model) == {"meta": 4}  # 3 unique parameters + the buffer
    assert tied_parameters(model) == [["embed.weight", "head.weight"]]


def test_record_parameter_registrations_sees_device_and_stops_after_block():
    with record_parameter_registrations() as seen:
        with torch.device("meta"):
            nn.Linear(3, 2)
    assert [(r.module, r.name, r.device) for r in seen] == [("Linear", "weight", "meta"), ("Linear", "bias", "meta")]
    nn.Linear(3, 2)  # outside the block: not recorded
    assert len(seen) == 2


@pytest.mark.parametrize("fn", [count_parameters, parameter_bytes, tied_parameters, tensor_devices])
def test_rejects_what_is_not_a_module(fn):
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fn({"weight": torch.ones(2)})


def test_is_inside_compares_whole_names():
    assert is_inside("layers.1.mlp.weight", "layers.1") and is_inside("layers.1", "layers.1")
    assert is_inside("lm_head.weight", "")  # "" is the whole model
    assert not is_inside("layers.10.weight", "layers.1") and not is_inside("layers.1", "layers.1.mlp")


@pytest.mark.parametrize("value, dtype", [(torch.float16, torch.float16), ("bfloat16", torch.bfloat16),
                                          ("torch.float32", torch.float32), ("fp32", torch.float32),
                                          ("fp16", torch.float16), ("bf16", torch.bfloat16), ("int8", torch.int8)])
def test_parse_dtype_reads_every_spelling(value, dtype):
    assert parse_dtype(value) is dtype


@pytest.mark.parametrize("bad", ["float17", "fp8", "Tensor", None, 16])
def test_parse_dtype_names_the_value_and_what_it_expects(bad):
    with pytest.raises(ValueError, match="expected a torch.dtype") as err:
        parse_dtype(bad)
    assert repr(bad) in str(err.value) and "'bf16'" in str(err.value)


def test_functions_called_names_what_ran_inside_a_package():
    import json

    result, called = functions_called(json, json.dumps, {"a": [1, 2]}, indent=1)
    assert result == '{\n "a": [\n  1,\n  2\n ]\n}'
    assert "dumps" in called and "encoder.encode" in called
    assert all(not name.split(".")[-1].startswith(("_", "<")) for name in called)
    _, none = functions_called(json, sum, [1, 2])      # nothing of json ran
    assert none == []


def test_functions_called_sees_accelerate_under_from_config(tiny_llama_config):
    import accelerate
    from accelerate import init_empty_weights as empty
    from transformers import AutoModelForCausalLM

    def build():
        with empty():
            return AutoModelForCausalLM.from_config(tiny_llama_config())

    model, called = functions_called(accelerate, build)
    assert "big_modeling.init_empty_weights" in called and "big_modeling.init_on_device" in called
    assert tensor_devices(model, buffers=False) == {"meta": len(list(model.parameters()))}


@pytest.mark.parametrize("package, fn", [("json", len), (len, len)])
def test_functions_called_rejects_what_is_not_a_package_or_callable(package, fn):
    import json

    with pytest.raises(TypeError, match="must be"):
        functions_called(json.decoder if package == "json" else package, fn)
    with pytest.raises(TypeError, match="fn .* must be callable"):
        functions_called(json, "not callable")
