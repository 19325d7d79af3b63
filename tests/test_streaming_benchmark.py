"""The streaming benchmark's command line (helpers.streaming_benchmark): options, the --shape mode's disk check,
its end-to-end path on a tiny model, and its cleanup. Fast; no timing is asserted."""

import json
import shutil
from collections import namedtuple

import pytest

from helpers import streaming_benchmark as bench


def test_benchmark_help_lists_device(run_python):
    out = " ".join(run_python("from helpers.streaming_benchmark import main; main(['--help'])").split())
    assert "--device {cpu,cuda}" in out and "(default cpu)" in out


def test_help_lists_the_shape_mode_options(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--shape {llama-2-70b}", "--layers", "--passes", "--source {inplace,split}", "--workdir"):
        assert option in out


def test_shape_config_is_the_known_model_with_fewer_layers():
    from helpers.arithmetic import known_config

    config, full = bench.shape_config("llama-2-70b", 2), known_config("llama-2-70b")
    assert config.num_hidden_layers == 2 and full.num_hidden_layers == 80
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(full, key)


def test_disk_check_refuses_before_writing(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**9, 10**9))  # 1 GB free
    wrote = []
    monkeypatch.setattr("helpers.models.synthetic_llama", lambda *a, **k: wrote.append(a))
    with pytest.raises(SystemExit) as e:
        bench.main(["--shape", "llama-2-70b", "--layers", "2", "--workdir", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and "not enough disk space" in err and "--workdir" in err and "is free" in err
    assert wrote == [] and list(tmp_path.iterdir()) == []  # nothing written, not even the run's folder


def test_plan_counts_a_split_twice(tiny_llama_config, tmp_path):
    inplace = bench.plan_shape(tiny_llama_config(), "bf16", "inplace", tmp_path)
    split = bench.plan_shape(tiny_llama_config(), "bf16", "split", tmp_path)
    assert split["written_bytes"] == 2 * inplace["written_bytes"] == 2 * inplace["weights_bytes"] > 0
    assert not inplace["bigger_than_ram"]  # a tiny model


@pytest.mark.parametrize("source", ["split", "inplace"])
def test_shape_mode_runs_end_to_end_on_a_tiny_model_and_cleans_up(tiny_llama_config, tmp_path, capsys, source):
    out = tmp_path / "report.json"
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("not the benchmark's")
    report = bench.main(["--shape", "llama-2-70b", "--layers", "2", "--source", source, "--workdir", str(work),
                         "--json", str(out), "--seq", "5"], config=tiny_llama_config(num_hidden_layers=2))
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]  # the run's folder went, the user's file stayed
    assert json.loads(out.read_text())["layers"] == 2
    stream = report["results"]["shape-stream"]
    assert "error" not in stream, stream
    assert len(stream["times"]) == 2 and [b["block"] for b in stream["blocks"]] == [
        "model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert stream["bytes_per_pass"] == sum(b["bytes"] for b in stream["blocks"]) > 0
    assert 0 < report["rss_of_ram"] < 1 and report["bigger_than_ram"] is False
    assert "error" not in report["results"]["layer"] and report["bound"] > 0
    x = report["extrapolation"]
    assert x["layers"] == 80 and x["arithmetic_fp16"]["layer_bytes"] == 1711308800  # Llama-2-70B's layer in fp16
    assert "llama-2-70b" in report["machine"]["command"] and report["machine"]["cores"] >= 1
    assert "not bigger than this machine's RAM" in capsys.readouterr().out


def test_interrupt_removes_what_it_wrote_and_keeps_the_workdir(tiny_llama_config, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    seen = []

    def interrupted(a, variant):
        seen.append(sorted(p.name for p in a.model.iterdir()))  # the model was written ...
        raise KeyboardInterrupt  # ... then Ctrl-C, during the first measurement

    monkeypatch.setattr(bench, "run_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shape", "llama-2-70b", "--layers", "2", "--source", "split", "--workdir", str(work)],
                   config=tiny_llama_config(num_hidden_layers=2))
    assert seen and "config.json" in seen[0]
    assert work.is_dir() and list(work.iterdir()) == []


def test_sigterm_unwinds_the_work_dir(tmp_path):
    import os
    import signal

    with pytest.raises(SystemExit) as e:
        with bench.work_dir(tmp_path, "probe-") as work:
            (work / "f").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not bench._raise_on_sigterm  # the handler before is back

