"""Tests for helpers/meta.py (chapter 01)."""

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import find_tied_parameters
from torch import nn

from helpers.meta import (count_parameters, parameter_bytes, record_parameter_registrations,
                          tensor_devices, tied_parameters)


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
    assert count_parameters(model) == 100 * (1000 * 1000 + 1000)
    assert parameter_bytes(model) == 4 * count_parameters(model)
    assert tensor_devices(model) == {"meta": 200}


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
