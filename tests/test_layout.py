"""helpers.layout: the blocks of a model on disk, one description for every chapter (naming, the tied head,
the split rule, sharded checkpoints and per-layer splits, and where each block's bytes lie)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import arithmetic, quant
from helpers import layout as lo
from helpers import tensorfiles as tf
from helpers.tensorfiles import CheckpointError

# --------------------------------------------------------------------------- naming and the split rule

@pytest.mark.parametrize("name,block", [
    ("model.layers.3.self_attn.q_proj.weight", "model.layers.3"),
    ("model.layers.12.mlp.experts.5.w1.weight", "model.layers.12"),  # the first number is the layer's
    ("model.embed_tokens.weight", "model.embed_tokens"),
    ("model.norm.weight", "model.norm"),
    ("lm_head.weight", "lm_head"),
    ("lm_head.weight.absmax", "lm_head"),  # a weight stored in parts (a codec's, bitsandbytes') goes with it
    ("lm_head.weight.quant_state.bitsandbytes__nf4", "lm_head"),
    ("model.layers.2.mlp.up_proj.weight.nested_quant_map", "model.layers.2"),
    ("transformer.h.0.attn.c_attn.bias", "transformer.h.0"),
    ("transformer.word_embeddings_layernorm.weight", "transformer.word_embeddings_layernorm"),
])
def test_block_of_names_the_layer_or_the_module(name, block):
    assert lo.block_of(name) == block


@pytest.mark.parametrize("model", ["llama-2-7b", "mpt-30b", "bloom-176b", "falcon-40b", "gpt-3-175b",
                                   "starcoder-15.5b", "smollm2-135m"])
def test_block_order_is_the_order_a_forward_pass_registers(model):
    """For every architecture the book meets, sorting the blocks by name gives the model's own order."""
    from helpers.arithmetic import meta_model

    registered = list(dict.fromkeys(lo.block_of(n) for n, _ in
                                    meta_model(arithmetic.known_config(model)).named_parameters(remove_duplicate=False)))
    assert sorted(registered, key=lo.block_order) == registered
    assert registered[-1] == lo.HEAD


def test_group_blocks_is_the_split_rule():
    names = {"model.embed_tokens.weight": "a", "model.layers.1.mlp.up_proj.weight": "b",
             "model.layers.0.input_layernorm.weight": "a", "model.layers.1.input_layernorm.weight": "a",
             "model.norm.weight": "b", "lm_head.weight": "b"}
    untied = lo.group_blocks(names, tied=False)
    assert list(untied) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert untied["model.layers.1"] == {"b": {"model.layers.1.mlp.up_proj.weight": "mlp.up_proj.weight"},
                                        "a": {"model.layers.1.input_layernorm.weight": "input_layernorm.weight"}}
    tied = lo.group_blocks(names, tied=True)  # the head reads the embedding's table; its stored copy is left out
    assert list(tied) == list(untied) and tied["lm_head"] == {"a": {"model.embed_tokens.weight": "weight"}}
    assert lo.is_tied([n for n in names if n != "lm_head.weight"], {})
    assert lo.is_tied(names, {"tie_word_embeddings": True})
    assert not lo.is_tied(names, {"tie_word_embeddings": False})
    with pytest.raises(ValueError, match="no tensor is a token embedding's table"):
        lo.group_blocks({"model.norm.weight": "a"}, tied=True)


def test_arithmetic_counts_the_blocks_a_split_writes(tmp_path, tiny_llama_config):
    """Chapter 02's block_bytes and chapter 03's split describe the same blocks, byte for byte."""
    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama

    for tied in (True, False):
        config = tiny_llama_config(tie_word_embeddings=tied)
        checkpoint = synthetic_llama(tmp_path / f"ckpt-{tied}", config, dtype=torch.float32, max_shard_size=40_000,
                                     progress=False)
        index = lo.read_layer_index(split_by_layer(checkpoint, tmp_path / f"split-{tied}", progress=False))
        counted = arithmetic.block_bytes(config, "fp32", skip_modules=())
        assert list(counted) == index.blocks
        assert {b: counted[b] for b in index.files} == index.bytes and (counted["lm_head"] == 0) == tied


# --------------------------------------------------------------------------- formats

def test_pack_shards_is_greedy_in_order():
    specs = [(str(i), (n,), torch.uint8) for i, n in enumerate([40, 50, 20, 200, 10])]
    shards = lo.pack_shards(specs, 100)
    assert [[name for name, _, _ in shard] for shard in shards] == [["0", "1"], ["2"], ["3"], ["4"]]
    with pytest.raises(ValueError, match="shard_bytes 0"):
        lo.pack_shards(specs, 0)


def test_save_sharded_then_weight_map_in_every_form(tmp_path):
    tensors = {f"layer.{i}.w": torch.full((64,), float(i)) for i in range(5)}
    names = lo.save_sharded(tmp_path, [(k, t.shape, t.dtype) for k, t in tensors.items()],
                            tensors.__getitem__, 2 * 64 * 4)
    assert sorted(set(names.values())) == [lo.shard_name(i, 3) for i in (1, 2, 3)]
    index = json.loads((tmp_path / lo.INDEX).read_text())
    assert index["metadata"] == {"total_parameters": 5 * 64, "total_size": 5 * 64 * 4}
    assert lo.weight_map(tmp_path) == (tmp_path, names) == lo.weight_map(tmp_path / lo.INDEX)
    one = tmp_path / "single"
    one.mkdir()
    save_file(tensors, one / lo.SINGLE)
    assert lo.weight_map(one) == (one, {k: lo.SINGLE for k in tensors})
    with pytest.raises(FileNotFoundError, match="not a safetensors checkpoint"):
        lo.weight_map(tmp_path / "nothing-here")


def test_read_layer_index_checks_what_it_reads(tmp_path):
    index = lo.LayerIndex(blocks=["model.embed_tokens", "lm_head"], files={"model.embed_tokens": "e.safetensors"},
                          tied={"lm_head.weight": "model.embed_tokens.weight"}, bytes={"model.embed_tokens": 8})
    index.write(tmp_path)
    back = lo.read_layer_index(tmp_path)
    assert back == index
    assert back.tied_source("lm_head") == ("model.embed_tokens", "model.embed_tokens.weight", "lm_head.weight")
    assert back.tied_source("model.embed_tokens") is None
    raw = json.loads((tmp_path / lo.LAYERS_INDEX).read_text())
    (tmp_path / lo.LAYERS_INDEX).write_text(json.dumps({**raw, "format": "other/9"}))
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        lo.read_layer_index(tmp_path)
    (tmp_path / lo.LAYERS_INDEX).write_text(json.dumps({**raw, "tied": {}}))
    with pytest.raises(CheckpointError, match="lm_head.*no file and no tied source"):
        lo.read_layer_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="split_by_layer"):
        lo.read_layer_index(tmp_path / "missing")


def test_read_layer_index_reads_the_compression(tmp_path):
    index = lo.LayerIndex(blocks=["model.norm"], files={"model.norm": "n.safetensors"}, tied={},
                          bytes={"model.norm": 8}, compression="nf4")
    index.write(tmp_path)
    assert lo.read_layer_index(tmp_path) == index and lo.read_layer_index(tmp_path).compression == "nf4"
    raw = json.loads((tmp_path / lo.LAYERS_INDEX).read_text())
    del raw["compression"]  # every index helpers writes says what stored it, null included
    (tmp_path / lo.LAYERS_INDEX).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="not a layer index helpers can read \\('compression'\\)"):
        lo.read_layer_index(tmp_path)
    (tmp_path / lo.LAYERS_INDEX).write_text(json.dumps({**raw, "compression": "zip"}))
    assert lo.read_layer_index(tmp_path).compression == "zip"  # a name; which names exist is helpers.quant's
    with pytest.raises(ValueError, match="compression 'zip'; expected one of None, 'int8', 'nf4'"):
        quant.codec(lo.read_layer_index(tmp_path).compression)
    (tmp_path / lo.LAYERS_INDEX).write_text(json.dumps({**raw, "compression": 8}))
    with pytest.raises(CheckpointError, match="compression 8; expected null or a codec's name"):
        lo.read_layer_index(tmp_path)



# --------------------------------------------------------------------------- where each block's bytes lie

def test_pieces_are_the_fewest_contiguous_ranges_of_a_blocks_tensors(tmp_path):
    path = tmp_path / "shard.safetensors"
    tensors = {"a.x": torch.randn(3), "a.y": torch.randn(2, 2), "b.x": torch.randn(5), "a.z": torch.randn(4).half(),
               "a.e": torch.zeros(0, 2)}
    save_file(tensors, path)  # safetensors orders by dtype, then name: a.e, a.x, a.y, b.x (f32), a.z (f16)
    header = tf.read_header(path)
    pieces = lo.pieces_of(header, {"a.x": "x", "a.y": "y", "a.z": "z"})
    assert [sorted(p.tensors) for p in pieces] == [["x", "y"], ["z"]]  # b.x sits between them
    assert [p.length for p in pieces] == [(3 + 4) * 4, 4 * 2]
    for piece in pieces:
        for views in (piece.views(tf.map_range(path, piece.start, piece.length)),
                      piece.views(tf.read_range(path, piece.start, piece.length)[0])):
            assert all(torch.equal(views[k], tensors[f"a.{k}"]) for k in piece.tensors)
    (one,) = lo.pieces_of(header, {k: k for k in tensors})  # the whole file: one range, its data region
    assert (one.start, one.length) == (header.data_start, header.data_bytes)
    with pytest.raises(CheckpointError, match="no readable entry for tensor 'a.nope'"):
        lo.pieces_of(header, {"a.nope": "nope"})
    broken = tf.Header(path, header.data_start, header.data_bytes - 1, header.tensors, {})  # as if truncated
    with pytest.raises(CheckpointError, match=r"tensor 'a.z' has data_offsets .* do not fit"):
        lo.pieces_of(broken, {"a.z": "z"})


def test_block_layout_of_a_checkpoint_is_its_splits(tmp_path, tiny_llama_config):
    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama

    checkpoint = synthetic_llama(tmp_path / "ckpt", tiny_llama_config(tie_word_embeddings=True), dtype=torch.float32,
                                 max_shard_size=40_000, progress=False)
    split = split_by_layer(checkpoint, tmp_path / "layers", progress=False)
    ours, theirs = lo.block_layout(checkpoint), lo.block_layout(split)
    assert (ours.kind, theirs.kind) == ("checkpoint", "split") and ours.compression is theirs.compression is None
    assert ours.blocks == theirs.blocks == lo.read_layer_index(split).blocks
    assert max(len(ours.pieces[b]) for b in ours.blocks) > 1 and all(len(theirs.pieces[b]) == 1 for b in theirs.blocks)
    for block in ours.blocks:
        assert ours.bytes(block) == theirs.bytes(block)  # every range holds only the block's tensors
        names = lambda layout, block=block: {k: v[:2] for p in layout.pieces[block]  # noqa: E731
                                             for k, v in p.tensors.items()}
        assert names(ours) == names(theirs)  # the same names in the block, dtypes and shapes
    assert list(ours.pieces["lm_head"][0].tensors) == ["weight"]  # tied: the embedding's table, as lm_head's weight
    assert ours.pieces["lm_head"] == ours.pieces["model.embed_tokens"]
    assert lo.layout_kind(checkpoint) == "checkpoint" and lo.layout_kind(split) == "split"
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is neither a per-layer split .* nor a safetensors"):
        lo.block_layout(tmp_path)


