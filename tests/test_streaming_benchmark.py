"""The streaming benchmark (helpers.bench, run as helpers.streaming_benchmark): its command line and frozen config,
the --shape mode's disk check, its end-to-end path on a tiny model and its cleanup, a child's result as a JSON
file, the read rows. Fast; no timing is asserted."""

import dataclasses
import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from helpers import bench
from helpers.bench import run as bench_run
from helpers.bench import shape as bench_shape
from helpers.bench.config import BenchConfig, Work, parse, parser, write_request


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

    config, full = bench_shape.shape_config("llama-2-70b", 2), known_config("llama-2-70b")
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
    inplace = bench_shape.plan_shape(tiny_llama_config(), "bf16", "inplace", tmp_path)
    split = bench_shape.plan_shape(tiny_llama_config(), "bf16", "split", tmp_path)
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
    reads = {k: v for k, v in report["results"].items() if k.startswith("read")}
    assert {"read (readinto)", "read (map)", "read (direct)", "read (buffered)"} <= set(reads)
    for name, row in reads.items():
        assert "error" not in row and row["bytes"] > 0 and row["cpu_seconds"] >= 0, (name, row)
    assert reads["read (direct)"]["method"] in ("direct", "buffered")  # buffered where O_DIRECT is refused
    assert stream["read"] in ("direct", "buffered")
    x = report["extrapolation"]
    assert x["layers"] == 80 and x["arithmetic_fp16"]["layer_bytes"] == 1711308800  # Llama-2-70B's layer in fp16
    assert "llama-2-70b" in report["machine"]["command"] and report["machine"]["cores"] >= 1
    assert "not bigger than this machine's RAM" in capsys.readouterr().out


def test_interrupt_removes_what_it_wrote_and_keeps_the_workdir(tiny_llama_config, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    seen = []

    def interrupted(c, work, variant):
        seen.append(sorted(p.name for p in work.model.iterdir()))  # the model was written ...
        raise KeyboardInterrupt  # ... then Ctrl-C, during the first measurement

    monkeypatch.setattr(bench_run, "run_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shape", "llama-2-70b", "--layers", "2", "--source", "split", "--workdir", str(work)],
                   config=tiny_llama_config(num_hidden_layers=2))
    assert seen and "config.json" in seen[0]
    assert work.is_dir() and list(work.iterdir()) == []


def test_sigterm_unwinds_the_work_dir(tmp_path):
    import os
    import signal

    with pytest.raises(SystemExit) as e:
        with bench_run.work_dir(tmp_path, "probe-") as work:
            (work / "f").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not bench_run.raise_on_sigterm  # the handler before is back



def test_config_is_frozen_and_travels_as_json(tmp_path):
    c = parse(parser(), ["--small", "--read", "buffered", "--dtype", "fp16", "--workdir", str(tmp_path)])
    assert (c.small, c.read, c.dtype, c.batch, c.workdir) == (True, "buffered", "fp16", 4, tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.batch = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.model = tmp_path  # nothing derived is set on it either
    assert BenchConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    shape = parse(parser(), ["--shape", "llama-2-70b"])
    assert (shape.batch, shape.dtype, shape.layers) == (1, "bf16", 16)  # the mode's own defaults
    assert dataclasses.replace(c, repeat=1).repeat == 1 and c.repeat == 2  # a copy; the config itself stays


@pytest.fixture
def tiny_work(tmp_path, tiny_llama_config):
    """A tiny synthetic checkpoint and its per-layer split, as a run lays them out."""
    import torch

    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama

    work = Work(model=tmp_path / "model", layers=tmp_path / "layers", out=tmp_path / "out")
    synthetic_llama(work.model, tiny_llama_config(), dtype=torch.float32, progress=False)
    split_by_layer(work.model, work.layers, progress=False)
    work.out.mkdir()
    return work


def test_a_child_writes_its_result_as_a_json_file(tiny_work):
    c = BenchConfig(repeat=1)
    request, result = tiny_work.out / "request.json", tiny_work.out / "result.json"
    write_request(request, c, tiny_work)
    proc = subprocess.run([sys.executable, "-m", "helpers.bench.child", "read", str(request), str(result)],
                          capture_output=True, text=True, cwd=Path(bench.__file__).parents[2], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT" not in proc.stdout  # the result is the file, not a line of stdout
    rows = json.loads(result.read_text())
    assert set(rows) == {"readinto", "safetensors", "map", "direct", "buffered"}
    direct = rows["direct"]
    assert direct["bytes"] > 0 and direct["seconds"] > 0 and direct["cpu_seconds"] >= 0
    assert direct["method"] in ("direct", "buffered") and rows["buffered"]["method"] == "buffered"
    assert all(r["cpu_seconds"] >= 0 for r in rows.values())


def test_the_parent_reads_the_file_and_records_a_failing_child(tiny_work, tmp_path):
    c = BenchConfig(repeat=1)
    rows = bench_run.read_rows(bench_run.run_variant(c, tiny_work, "read"))
    assert "cpu_seconds" in rows["read (direct)"] and "error" not in rows["read (direct)"]
    assert list(tiny_work.out.iterdir()) == []  # the request and result files went
    broken = dataclasses.replace(tiny_work, model=tmp_path / "nothing-here", layers=None)
    failed = bench_run.run_variant(c, broken, "read")
    assert list(failed) == ["error"] and "nothing-here" in failed["error"], failed  # the child's last stderr line
    assert bench_run.read_rows(failed) == {"read (readinto)": failed}
    assert list(tiny_work.out.iterdir()) == []  # a failing child leaves no result file


def test_a_failing_child_leaves_no_file(tmp_path):
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    write_request(request, BenchConfig(), Work(model=tmp_path / "missing", layers=None, out=tmp_path))
    proc = subprocess.run([sys.executable, "-m", "helpers.bench.child", "read", str(request), str(result)],
                          capture_output=True, text=True, cwd=Path(bench.__file__).parents[2], timeout=300)
    assert proc.returncode != 0 and "missing" in proc.stderr.strip().splitlines()[-1]
    assert not result.exists()


def test_the_table_prints_cpu_seconds_and_reads_committed_reports(capsys):
    from helpers.bench import committed as read_committed

    committed = read_committed("streaming-2gb.json")
    for name, row in committed["results"].items():  # a report from before the read rows had CPU seconds ...
        if name.startswith("read ("):
            row.pop("cpu_seconds", None)
    bench.print_table(committed)  # ... prints without them
    assert "CPU-s/GB" not in capsys.readouterr().out
    bench.print_shape(read_committed("llama-2-70b-16-layers.json"))
    assert "extrapolated to 80 layers" in capsys.readouterr().out
    row = dict(committed["results"]["read (map)"], cpu_seconds=0.5, bytes=2 * 10**9, method="direct")
    committed["results"]["read (direct)"] = row
    bench.print_table(committed)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("read (direct)"))
    assert "0.50 CPU-s (0.25 CPU-s/GB)" in line and "ran" not in line


def test_committed_results_ship_inside_the_package():
    """Chapter 08 reads them with importlib.resources: from a wheel, with no network and no checkout."""
    from helpers.bench import COMMITTED, committed

    for name in COMMITTED:
        report = committed(name)
        assert report["results"] and report["machine"]["command"].startswith("python")
    with pytest.raises(ValueError, match="no committed benchmark result 'other.json'"):
        committed("other.json")
