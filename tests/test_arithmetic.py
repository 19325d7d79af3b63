"""Tests for helpers.arithmetic (chapter 02): exact counts, byte formulas, and bad inputs."""

import json
import math

import pytest
import torch

from helpers import arithmetic as ar
from helpers.meta import count_parameters


def n_params(config) -> int:
    """A config's exact parameter count: chapter 01's count_parameters of chapter 02's meta model."""
    return count_parameters(ar.meta_model(config))


@pytest.fixture(scope="module")
def llama7b():
    return ar.known_config("llama-2-7b")


@pytest.fixture(scope="module")
def book():
    return ar.known_config("smollm2-135m")


@pytest.fixture
def tiny_llama(tiny_llama_config):
    """conftest's tiny Llama with a head_dim that is not hidden_size / heads, and an odd vocabulary."""
    return lambda **overrides: tiny_llama_config(**{"head_dim": 24, "vocab_size": 101, **overrides})


# --------------------------------------------------------------------------- configs and counts

def test_known_models_listed():
    for name in ["llama-2-70b", "llama-2-7b", "gpt-3-175b", "bloom-176b", "falcon-40b", "mpt-30b",
                 "starcoder-15.5b", "smollm2-135m"]:
        assert name in ar.known_models()


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="llama-2-70b") as err:
        ar.known_config("llama-3-8b")
    assert "llama-3-8b" in str(err.value)


def test_book_config_matches_book_model(book, book_dir):
    on_disk = json.loads((book_dir / "config.json").read_text())
    ours = book.to_dict()
    for key, value in on_disk.items():
        if key in ("transformers_version", "_name_or_path", "_model_name_or_path"):
            continue
        assert ours.get(key) == value, key


def test_exact_llama_counts(llama7b):
    assert n_params(ar.known_config("llama-2-70b")) == 68_976_648_192
    assert n_params(llama7b) == 6_738_415_616


def test_tied_embeddings_counted_once(book, book_dir):
    # the checkpoint stores every tensor once, in fp16: its total_size is 2 bytes per parameter
    index = json.loads((book_dir / "model.safetensors.index.json").read_text())
    assert n_params(book) * 2 == index["metadata"]["total_size"]
    untied = ar.known_config("smollm2-135m")
    untied.tie_word_embeddings = False
    assert n_params(untied) == n_params(book) + 49152 * 576


def test_count_matches_a_real_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    config = tiny_llama()
    model = AutoModelForCausalLM.from_config(config)
    assert n_params(config) == sum(p.numel() for p in model.parameters())


def test_meta_model_rejects_non_config():
    with pytest.raises(ValueError, match="PretrainedConfig"):
        ar.meta_model({"hidden_size": 8})


# --------------------------------------------------------------------------- bytes per parameter

def test_bytes_per_param_values():
    assert ar.bytes_per_param("fp32") == 4 and ar.bytes_per_param(torch.float32) == 4
    assert ar.bytes_per_param("bf16") == 2 == ar.bytes_per_param(torch.bfloat16)
    assert ar.bytes_per_param("fp16") == 2 == ar.bytes_per_param(torch.float16)
    assert ar.bytes_per_param("int8") == pytest.approx(1 + 4 / 4096)
    assert ar.bytes_per_param("int8", row_size=1024) == pytest.approx(1 + 4 / 1024)
    assert ar.bytes_per_param("nf4") == ar.bytes_per_param("fp4") == pytest.approx(0.5625)
    assert ar.bytes_per_param("nf4", double_quant=True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))


@pytest.mark.parametrize("bad", ["int4", "float8", torch.int8, None, 2])
def test_bad_dtype_names_value_and_choices(bad):
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8, nf4, fp4") as err:
        ar.bytes_per_param(bad)
    assert repr(bad) in str(err.value)


def test_bad_row_size():
    with pytest.raises(ValueError, match="row_size"):
        ar.bytes_per_param("int8", row_size=0)


# --------------------------------------------------------------------------- weights and blocks

def test_float_weight_bytes(llama7b):
    n = 6_738_415_616  # Llama-2-7B's published parameter count
    assert ar.weight_bytes(llama7b, "fp32") == 4 * n
    assert ar.weight_bytes(llama7b, torch.bfloat16) == 2 * n


def test_quantized_weight_bytes_by_hand(tiny_llama):
    config = tiny_llama()  # every Linear has a multiple of 64 weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    q = sum(m.weight.numel() for m in linears.values())
    rows = sum(m.out_features for m in linears.values())
    rest = 2 * (n_params(config) - q)
    assert ar.weight_bytes(config, "int8") == q + 4 * rows + rest
    assert ar.weight_bytes(config, "nf4") == q // 2 + 4 * (q // 64) + rest
    blocks = [m.weight.numel() // 64 for m in linears.values()]
    nested = sum(b + 4 * math.ceil(b / 256) + 4 for b in blocks)
    assert ar.weight_bytes(config, "nf4", double_quant=True) == q // 2 + nested + rest


def test_skip_modules_keeps_lm_head_unquantized(llama7b):
    head = 32000 * 4096
    keep = ar.weight_bytes(llama7b, "nf4")
    quantize_all = ar.weight_bytes(llama7b, "nf4", skip_modules=())
    assert keep - quantize_all == 2 * head - (head // 2 + 4 * head // 64)
    assert ar.weight_bytes(llama7b, "nf4") < ar.weight_bytes(llama7b, "int8") < ar.weight_bytes(llama7b, "fp16")


def test_gpt2_conv1d_is_quantized():
    gpt3 = ar.known_config("gpt-3-175b")
    assert ar.weight_bytes(gpt3, "int8") < 0.55 * ar.weight_bytes(gpt3, "fp16")


def test_block_bytes_order_and_sum(llama7b, book):
    blocks = ar.block_bytes(llama7b, "fp16")
    names = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(32)] + ["model.norm", "lm_head"]
    assert list(blocks) == names
    assert sum(blocks.values()) == ar.weight_bytes(llama7b, "fp16")
    assert blocks["lm_head"] == 32000 * 4096 * 2
    tied = ar.block_bytes(book, "fp32")
    assert tied["lm_head"] == 0 and tied["model.embed_tokens"] == 49152 * 576 * 4
    assert sum(tied.values()) == ar.weight_bytes(book, "fp32")
    assert sum(ar.block_bytes(llama7b, "nf4").values()) == ar.weight_bytes(llama7b, "nf4")


def test_block_bytes_rejects_unknown_argument(llama7b):
    with pytest.raises(ValueError, match="unexpected"):
        ar.block_bytes(llama7b, "fp16", skip=("lm_head",))


def test_block_bytes_other_architectures():
    mpt = ar.block_bytes(ar.known_config("mpt-30b"), "bf16")
    assert list(mpt)[0] == "transformer.wte" and list(mpt)[-2:] == ["transformer.norm_f", "lm_head"]
    assert len(mpt) == 48 + 3


# --------------------------------------------------------------------------- runtime tensors

@pytest.mark.parametrize("kv_heads,head_dim", [(2, 24), (4, None), (1, 16)])
def test_kv_cache_matches_dynamic_cache(tiny_llama, kv_heads, head_dim):
    from transformers import AutoModelForCausalLM

    config = tiny_llama(num_key_value_heads=kv_heads, head_dim=head_dim)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    measured = 0
    for layer in cache.layers:
        measured += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    assert ar.kv_cache_bytes(config, 2, 7, "fp32") == measured


def test_kv_cache_gqa_and_mqa(llama7b):
    seventy = ar.known_config("llama-2-70b")
    assert ar.kv_cache_bytes(seventy, 1, 4096, "fp16") == 2 * 80 * 4096 * 8 * 128 * 2
    assert ar.kv_cache_bytes(llama7b, 1, 4096, "fp16") == 2 * 32 * 4096 * 32 * 128 * 2
    assert ar.kv_cache_bytes(ar.known_config("starcoder-15.5b"), 1, 100, "fp16") == 2 * 40 * 100 * 1 * 128 * 2
    assert ar.kv_cache_bytes(ar.known_config("falcon-40b"), 1, 100, "bf16") == 2 * 60 * 100 * 8 * 64 * 2


@pytest.mark.parametrize("fn", [ar.kv_cache_bytes, ar.activation_bytes])
def test_runtime_bad_inputs(fn, llama7b):
    with pytest.raises(ValueError, match="batch_size 0"):
        fn(llama7b, 0, 10, "fp16")
    with pytest.raises(ValueError, match="seq_len"):
        fn(llama7b, 1, 2.5, "fp16")
    with pytest.raises(ValueError, match="'nf4'"):
        fn(llama7b, 1, 10, "nf4")


def test_activation_bytes_grows_with_tokens(book):
    small = ar.activation_bytes(book, 1, 64, "fp32")
    assert ar.activation_bytes(book, 2, 64, "fp32") == 2 * small
    assert ar.activation_bytes(book, 1, 64, "bf16") * 2 == small
    assert small >= 64 * 49152 * 4  # the logits alone


def test_activation_bytes_of_the_math_kernel_add_the_fp32_score_matrix_and_its_softmax():
    llama7b = ar.known_config("llama-2-7b")  # 32 heads, hidden 4096
    fused = ar.activation_bytes(llama7b, 1, 4096, "fp16")
    assert fused == ar.activation_bytes(llama7b, 1, 4096, "fp16", attention="fused")
    attention = 6 * 4096 * 4096 * 2 + 2 * 4 * 32 * 4096**2  # q, k, v ... in fp16, then scores and softmax in fp32
    assert ar.activation_bytes(llama7b, 1, 4096, "fp16", attention="math") == max(fused, attention) == attention
    assert attention > 4 * 2**30  # 4 GiB of scores alone at 4k tokens: what a T4 running MATH has to find
    short = ar.activation_bytes(llama7b, 1, 16, "fp16", attention="math")  # short: the logits still dominate
    assert short == ar.activation_bytes(llama7b, 1, 16, "fp16")
    with pytest.raises(ValueError, match="attention 'flash' must be 'fused' or 'math'"):
        ar.activation_bytes(llama7b, 1, 16, "fp16", attention="flash")


# --------------------------------------------------------------------------- ledger and feasibility

def test_estimate_ledger_against_a_real_forward_pass(book, book_model, book_dir):
    """Every line of the ledger against the real book model (fp32) and the tensors of one 16-token pass."""
    model, _ = book_model
    with torch.no_grad():
        out = model(torch.arange(16).unsqueeze(0), use_cache=True, output_hidden_states=True)
    weights = sum(p.nbytes for p in model.parameters())  # the tied LM head once
    cache = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
    logits = out.logits.nbytes + 2 * out.hidden_states[-1].nbytes  # the peak: logits and two hidden-size buffers
    ledger = ar.estimate(book, "fp32", 1, 16)
    assert (ledger.weights, ledger.kv_cache, ledger.activations, ledger.overhead) == (weights, cache, logits, 0)
    assert ledger.total == weights + cache + logits
    assert weights == 4 * 134_515_008  # SmolLM2-135M's published parameter count
    text = ledger.table()
    assert "total" in text and "weights" in text and str(ledger) == text
    assert ar.estimate(book, "fp32", device="cuda").overhead == ar.CUDA_CONTEXT_BYTES
    # converting from the fp16 files: the whole checkpoint is resident next to the fp32 weights
    on_disk = sum(p.stat().st_size for p in book_dir.glob("*.safetensors"))
    converting = ar.estimate(book, "fp32", 1, 16, checkpoint_dtype="fp16")
    assert converting.total == pytest.approx(weights + on_disk, rel=1e-3)  # the files add their headers


def test_zero_copy_leaves_untied_embeddings_on_disk(llama7b):
    full = ar.estimate(llama7b, "bf16", 1, 10)
    mapped = ar.estimate(llama7b, "bf16", 1, 10, checkpoint_dtype="bf16")
    assert full.weights - mapped.weights == (32000 - 10) * 4096 * 2


def test_estimate_plot(book):
    import matplotlib
    matplotlib.use("Agg")
    ax = ar.estimate(book, "bf16", label="book").plot()
    assert ax.get_ylabel() == "memory (GiB)" and len(ax.patches) == 4


def test_estimate_bad_inputs(book):
    with pytest.raises(ValueError, match="'tpu'"):
        ar.estimate(book, "fp16", device="tpu")
    with pytest.raises(ValueError, match="'fp8'"):
        ar.estimate(book, "fp8")


def test_feasibility_for_a_t4(llama7b):
    seventy = ar.known_config("llama-2-70b")
    assert ar.feasibility(llama7b, "nf4", "16GB", "32GB") == "fits on GPU"
    assert ar.feasibility(ar.known_config("starcoder-15.5b"), "fp16", "16GB", "32GB") == "needs CPU offload"
    # quantized blocks kept quantized when offloaded (what one might wish) ...
    assert ar.feasibility(seventy, "nf4", "16GB", "32GB", offload_dtype="nf4") == "needs CPU offload"
    assert ar.feasibility(seventy, "int8", "16GB", "32GB", offload_dtype="int8") == "needs disk offload"
    # ... and unquantized, in the dtype the model is loaded in (compute_dtype, fp16 by default), as transformers
    # + bitsandbytes really keep them with llm_int8_enable_fp32_cpu_offload (chapter 06 shows the code)
    assert ar.feasibility(seventy, "nf4", "16GB", "32GB") == "needs streaming"
    assert ar.feasibility(seventy, "nf4", "16GB", "200GB") == "needs CPU offload"
    # 100 GB of RAM holds the offloaded blocks in fp16 (the default), not in fp32 (the flag's name)
    assert ar.feasibility(seventy, "nf4", "16GB", "100GB") == "needs CPU offload"
    assert ar.feasibility(seventy, "nf4", "16GB", "100GB", offload_dtype="fp16") == "needs CPU offload"
    assert ar.feasibility(seventy, "nf4", "16GB", "100GB", offload_dtype="fp32") == "needs disk offload"
    assert ar.feasibility(seventy, "int8", "16GB", "100GB") == "needs disk offload"
    assert ar.feasibility(seventy, "int8", "16GB", "100GB", offload_dtype="fp32") == "needs streaming"
    assert ar.feasibility(seventy, "nf4", "16GB", "100GB", compute_dtype="bf16") == "needs CPU offload"
    with pytest.raises(ValueError, match="compute dtype 'nf4'"):
        ar.feasibility(seventy, "nf4", "16GB", "100GB", compute_dtype="nf4")
    assert ar.feasibility(seventy, "fp16", "16GB", "32GB") == "needs streaming"
    assert ar.feasibility(seventy, "fp16", "1GB", "32GB") == "does not fit"
    with pytest.raises(ValueError, match="16 parsecs"):
        ar.feasibility(llama7b, "fp16", "16 parsecs", "32GB")


def test_machine_profiles_are_the_published_t4_boxes():
    import dataclasses

    from helpers.arithmetic import MACHINES, Machine, machine

    colab, kaggle = machine("colab-free-t4"), machine("kaggle-t4x2")
    assert (colab.gpus, kaggle.gpus) == (1, 2)
    for m in (colab, kaggle):
        assert 14 * 2**30 < m.gpu_bytes < 15 * 2**30 + 1  # what a T4 exposes, not 16 x 10**9 bytes
        assert "http" in m.source and m.name in MACHINES
    assert 12 * 2**30 < colab.ram_bytes < 13 * 2**30  # free Colab: 12.7 GB, not 32
    assert 28 * 2**30 < kaggle.ram_bytes < 31 * 2**30
    assert machine(colab) is colab
    with pytest.raises(dataclasses.FrozenInstanceError):
        colab.ram_bytes = 0
    with pytest.raises(ValueError, match="unknown machine 'colab'; known machines are: colab-free-t4"):
        machine("colab")
    with pytest.raises(ValueError, match="ram_bytes -1 must be an int >= 0"):
        Machine("x", 1, 1, -1, None, "")


def test_feasibility_offloads_quantized_blocks_in_their_load_dtype_and_reads_machines(llama7b):
    starcoder = ar.known_config("starcoder-15.5b")
    # int8 StarCoder on a free Colab T4: the offloaded blocks cost 2 bytes per weight (fp16), not 1
    assert ar.feasibility(starcoder, "int8", machine="colab-free-t4", offload_dtype="int8") == "needs CPU offload"
    assert ar.feasibility(starcoder, "int8", machine="colab-free-t4") == "needs CPU offload"
    # MPT-30B nf4 on a free Colab T4: 8 GiB of fp16 blocks fit its RAM (chapter 06's table), 16 GiB of fp32 do not
    mpt = ar.known_config("mpt-30b")
    assert ar.feasibility(mpt, "nf4", machine="colab-free-t4") == "needs CPU offload"
    assert ar.feasibility(mpt, "nf4", machine="colab-free-t4", offload_dtype="fp32") == "needs disk offload"
    assert ar.feasibility(starcoder, "int8", machine="kaggle-t4x2") == "fits on GPU"  # two T4s pooled
    colab = ar.machine("colab-free-t4")
    assert (ar.feasibility(llama7b, "fp16", machine=colab)
            == ar.feasibility(llama7b, "fp16", colab.gpu_bytes, colab.ram_bytes) == "fits on GPU")
    huge = 10 * 2**30
    assert ar.feasibility(llama7b, "fp16", machine=colab, context_bytes=huge) == "needs CPU offload"
    with pytest.raises(ValueError, match="either machine or gpu_bytes"):
        ar.feasibility(llama7b, "fp16", "16GB", "32GB", machine="colab-free-t4")
    with pytest.raises(ValueError, match="give machine"):
        ar.feasibility(llama7b, "fp16")
    with pytest.raises(ValueError, match="unknown machine 'tpu'"):
        ar.feasibility(llama7b, "fp16", machine="tpu")
    with pytest.raises(ValueError, match="context_bytes -1"):
        ar.estimate(llama7b, "fp16", device="cuda", context_bytes=-1)
    assert ar.estimate(llama7b, "fp16", device="cuda", context_bytes=123).overhead == 123
