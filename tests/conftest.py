"""What the test files share.

Fixtures:

* ``book_model``: ``(model, tokenizer)``, the book model in fp32 on the CPU, loaded once per test session.
  Every test that asks for it gets the same object, so **no test may change it**: no ``.to()``, ``.half()``
  or ``.train()``, no edits to weights, config or generation settings, no hooks left behind. A test that
  needs to change a model loads its own with ``helpers.models.load_book_model()``. At the end of the session
  the fixture checks that the weights, dtypes and devices are what it loaded, and fails loudly if not.
* ``book_dir``: the book model's sharded fp16 checkpoint folder (``helpers.models.book_model_dir()``).
* ``tiny_llama_config``: a factory; ``tiny_llama_config(**overrides)`` returns a fresh, small
  ``transformers.LlamaConfig`` (:data:`TINY_LLAMA` with ``overrides`` on top).
* ``run_python``: ``run_python(code, *args, cwd=None, env=None)`` runs ``code`` in a fresh Python process
  (this interpreter) and returns its stdout; a non-zero exit fails the test with the process's stderr.

Marker: ``@pytest.mark.cuda`` for tests that need a CUDA GPU; they are skipped where torch sees none.
"""

import os
import subprocess
import sys

import pytest
import torch

# Small enough to build in milliseconds, big enough to have GQA (4 query heads, 2 KV heads), several
# layers and untied embeddings; tests change what they are about through overrides.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)


def pytest_configure(config):
    # registered here as well as in pyproject.toml, so that the tests run copied out of a checkout too
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def book_dir():
    from helpers.models import book_model_dir

    return book_model_dir()


def _fingerprint(model) -> dict:
    """Name -> (dtype, device, shape, storage, in-place edits, sum) of every parameter and buffer, and the mode."""
    with torch.no_grad():
        tensors = {name: (t.dtype, t.device, tuple(t.shape), t.data_ptr(), t._version, t.float().sum().item())
                   for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return {"training": model.training, **tensors}


@pytest.fixture(scope="session")
def book_model(book_dir):
    """The book model and its tokenizer, shared by the whole session: read it, never change it."""
    from helpers.models import load_book_model

    model, tokenizer = load_book_model()
    before = _fingerprint(model)
    yield model, tokenizer
    changed = [name for name, value in _fingerprint(model).items() if before.get(name) != value]
    if changed:
        pytest.fail(f"a test changed the shared book_model ({', '.join(changed[:5])}"
                    f"{', ...' if len(changed) > 5 else ''}); tests must load their own copy to change one "
                    "(helpers.models.load_book_model())", pytrace=False)


@pytest.fixture
def tiny_llama_config():
    """``tiny_llama_config(**overrides)``: a fresh ``LlamaConfig`` of ``TINY_LLAMA`` with ``overrides``."""
    from transformers import LlamaConfig

    def make(**overrides):
        return LlamaConfig(**{**TINY_LLAMA, **overrides})

    return make


@pytest.fixture(scope="session")
def run_python():
    """``run_python(code, *args, cwd=None, env=None)``: stdout of ``python -c code *args`` in a fresh process."""

    def run(code: str, *args: str, cwd=None, env=None) -> str:
        done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=None if env is None else {**os.environ, **env})
        if done.returncode != 0:
            pytest.fail(f"the child Python process exited with {done.returncode}:\n{done.stderr}", pytrace=False)
        return done.stdout

    return run
