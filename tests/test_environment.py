"""helpers.environment: the report chapter 00 prints."""

from helpers.environment import in_colab, in_kaggle, report


def test_report_has_the_essentials(tmp_path):
    info = report(tmp_path)
    for key in ["python", "cpu cores", "RAM total", "disk free", "torch", "transformers", "GPU", "helpers"]:
        assert key in info and info[key]
    assert info["helpers"] != "not installed"


def test_not_colab_or_kaggle_here(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not in_kaggle() and not in_colab()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert in_kaggle()
