"""helpers.environment: the report chapter 00 prints."""

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import helpers
from helpers.environment import RuntimeVersionError, in_colab, in_kaggle, prepare, report, requirements


def test_report_has_the_essentials(tmp_path):
    info = report(tmp_path)
    for key in ["python", "cpu cores", "RAM total", "disk free", "torch", "transformers", "GPU", "helpers"]:
        assert key in info and info[key]
    assert info["helpers"] == helpers.__version__  # the installed distribution's version is the package's


def test_not_colab_or_kaggle_here(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not in_kaggle() and not in_colab()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert in_kaggle()


# --------------------------------------------------------------------------- the first cell's check

def _bounds(lines) -> dict[str, str]:
    return {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, lines)}


def test_requirements_are_the_installed_dependencies_without_the_extras():
    installed = _bounds(requirements())
    assert installed["transformers"].startswith(">=5") and "torch" in installed
    # the book and test extras are not every chapter's needs: prepare() must not ask a reader for them
    assert not {"bitsandbytes", "matplotlib", "pytest", "jupyter-book"} & set(installed), sorted(installed)
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():  # a checkout; make test-latest runs a copy of these tests against a wheel
        import tomllib

        declared = _bounds(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
        assert installed == declared, "the installed helpers is not this pyproject.toml's: run make setup"


def test_requirements_leave_out_what_only_an_extra_needs(monkeypatch):
    from helpers import environment

    lines = ["torch>=2.10", 'bitsandbytes>=0.50; extra == "book"', 'pytest>=8; extra == "test"', "numpy>=1.26"]
    monkeypatch.setattr(environment.metadata, "requires", lambda dist: lines)  # as a wheel with extras has them
    assert requirements() == ["torch>=2.10", "numpy>=1.26"]


def test_prepare_passes_here_and_turns_library_bars_off(monkeypatch):
    import huggingface_hub
    import transformers

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers.utils.logging.enable_progress_bar()
    try:
        prepare("numpy>=1")
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        transformers.utils.logging.enable_progress_bar()


@pytest.mark.parametrize("need, expected", [
    ("transformers>=999", "this chapter needs transformers>=999, this runtime has {transformers}: "
                          "run `pip install -U 'transformers>=999'` and restart the runtime"),
    ("no-such-package-xyz>=1", "this chapter needs no-such-package-xyz>=1, which this runtime does not have"),
])
def test_a_missing_or_old_library_stops_with_one_sentence(need, expected):
    import transformers

    with pytest.raises(RuntimeVersionError) as info:
        prepare(need)
    message = str(info.value)
    assert message.startswith(expected.format(transformers=transformers.__version__))
    assert "\n" not in message


def test_a_library_upgraded_after_import_asks_for_a_restart(monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="1.0.0"))
    with pytest.raises(RuntimeVersionError, match=r"numpy 1.0.0 was imported before .* restart the runtime"):
        prepare("numpy>=1")


def test_in_a_notebook_the_error_is_one_line():
    lines = RuntimeVersionError("this chapter needs x>=2, this runtime has 1: run ...")._render_traceback_()
    assert lines == ["RuntimeVersionError: this chapter needs x>=2, this runtime has 1: run ..."]


def test_an_uninstalled_checkout_says_how_to_install_it(monkeypatch):
    from helpers import environment

    def missing(name):
        raise environment.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(environment.metadata, "requires", missing)
    with pytest.raises(RuntimeVersionError, match=r"'bigger-than-memory' is not installed.*pip install -e"):
        prepare()


def test_ran_where_names_the_machine_the_device_and_the_versions():
    from helpers.environment import ran_where

    info = {"runtime": "local", "platform": "Linux x86_64", "cpu cores": "2", "RAM total": "23.5 GiB",
            "python": "3.11.9", "torch": "2.13.0", "transformers": "5.24.0", "accelerate": "1.15.0",
            "bitsandbytes": "not installed", "GPU": "none (CPU only)"}
    line = ran_where(info)
    assert "2 CPU cores" in line and "23.5 GiB" in line and "torch 2.13.0, transformers 5.24.0" in line
    assert "no GPU ran" in line and "bitsandbytes" not in line          # no version claimed for what is absent
    on_gpu = ran_where({**info, "GPU": "1 x Tesla T4, 14.7 GiB"})
    assert "on 1 x Tesla T4, 14.7 GiB" in on_gpu and "no GPU ran" not in on_gpu


def test_prepare_says_what_ran_where(capsys):
    prepare("numpy>=1")
    assert capsys.readouterr().out.startswith("**What ran where.**")
