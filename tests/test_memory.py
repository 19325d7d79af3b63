"""helpers.memory: size strings and the peak-memory probe."""

import pytest
from accelerate.utils import convert_file_size_to_int

from helpers.memory import flush, format_size, measure, parse_size, rss_bytes

MiB = 2**20


@pytest.mark.parametrize("text", ["10GiB", "10GB", "500MB", "1.5GB", "3MiB", "7KiB", "12KB", "2Gb", "10MB", "0.5GiB"])
def test_parse_size_agrees_with_accelerate(text):
    assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize("text, expected", [
    (1024, 1024), ("1024", 1024), ("1024B", 1024), ("10 GB", 10 * 10**9), ("1TiB", 2**40), ("2TB", 2 * 10**12),
    ("8Gb", 10**9), (0, 0),
])
def test_parse_size_extras(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["10 GBB", -1, "ten", "", "GB", "1.2.3MB", "-5MB", None, 1.5, True, "10 XB"])
def test_parse_size_rejects_bad_values_naming_them(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(").replace(".", r"\.")):
        parse_size(bad)


def test_format_size_conventions():
    assert format_size(512 * MiB) == "512.0 MiB"
    assert format_size(10**9, binary=False) == "1.0 GB"
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(3 * 2**40) == "3.0 TiB"
    assert format_size(-2048) == "-2.0 KiB"
    for n in [1, 1500, 10**7, 5 * 2**30]:  # round trip within the printed precision
        assert abs(parse_size(format_size(n, precision=3).replace(" ", "")) - n) <= 0.001 * n + 1
    with pytest.raises(ValueError, match="'x'"):
        format_size("x")


def test_measure_reads_a_512_mib_tensor_within_2_percent():
    import torch

    with measure() as m:
        x = torch.empty(512 * MiB, dtype=torch.uint8)
        x.fill_(1)  # touch every page so it is resident
        del x
    assert m.cpu_peak_bytes == pytest.approx(512 * MiB, rel=0.02), format_size(m.cpu_peak_bytes)
    assert m.seconds > 0
    assert m.cuda_peak_bytes == (0 if torch.cuda.is_available() else None)  # nothing on the GPU; no GPU, no number


@pytest.mark.cuda
def test_measure_reads_a_512_mib_cuda_tensor_exactly():
    import torch

    with measure() as m:
        x = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
        del x
    assert m.cuda_peak_bytes == 512 * MiB, format_size(m.cuda_peak_bytes)


def test_measure_sees_nothing_for_untouched_or_meta_memory():
    import torch

    with measure() as m:
        torch.empty(10**9, dtype=torch.uint8, device="meta")
    assert m.cpu_peak_bytes < 16 * MiB


_SAMPLING = """
import time
import numpy as np
import helpers.memory as memory
with memory.measure(sample_interval=0.0005, method="sampling") as m:  # as where there is no VmHWM
    x = np.ones(256 * 2**20 // 8)
    time.sleep(0.05)  # give the sampler time to see it
    del x
print(m.method, m.cpu_peak_bytes)
"""


def test_measure_sampling_fallback(run_python):
    """In a fresh process, so that no thread left over from another test frees memory during the block."""
    method, peak = run_python(_SAMPLING).split()
    assert method == "sampling"
    assert int(peak) == pytest.approx(256 * MiB, rel=0.05)


def test_measure_rejects_bad_interval_and_method():
    with pytest.raises(ValueError, match="sample_interval 0 must be > 0 seconds"):
        measure(sample_interval=0)
    with pytest.raises(ValueError, match="method 'VmHWM' must be 'auto' or 'sampling'"):
        measure(method="VmHWM")


def test_flush_and_rss():
    flush()
    assert rss_bytes() > 10 * MiB


_FREE_LOOP = """
import sys, torch
from helpers.memory import release_on_free, rss_bytes
if sys.argv[1] == "release" and not release_on_free():
    print("not glibc"); sys.exit()
kept = []
for _ in range(3):
    before = rss_bytes()
    x = torch.ones(8 * 2**20, dtype=torch.uint8)
    del x
    kept.append(rss_bytes() - before)
print(max(kept[1:]))
"""


@pytest.mark.parametrize("mode", ["default", "release"])
def test_release_on_free_returns_freed_tensors_at_once(run_python, mode):
    """In a fresh process: by default glibc keeps a freed 8 MiB tensor for reuse; after release_on_free() it does
    not."""
    out = run_python(_FREE_LOOP, mode)
    if out.strip() == "not glibc":
        pytest.skip("the C library is not glibc")
    kept = int(out)
    if mode == "release":
        assert kept < MiB
    else:
        assert kept > 7 * MiB  # the behaviour release_on_free exists to turn off


@pytest.mark.parametrize("bad", [0, -1, 64 * MiB, 1.5, "64KiB", True])
def test_release_on_free_rejects_bad_thresholds(bad):
    from helpers.memory import release_on_free

    with pytest.raises(ValueError, match="threshold"):
        release_on_free(bad)


def test_rss_split_adds_up_to_rss():
    from helpers.memory import rss_split

    split = rss_split()
    if split is None:
        pytest.skip("this OS does not report RssAnon/RssFile")
    assert set(split) == {"anon", "file", "shmem"}
    assert sum(split.values()) == pytest.approx(rss_bytes(), rel=0.05)


def test_measure_splits_a_mapped_file_from_a_tensor(tmp_path):
    """Touching a mapped file raises the file-backed peak, not the anonymous one; a tensor the opposite."""
    import mmap
    import time

    import torch

    from helpers.memory import rss_split

    if rss_split() is None:
        pytest.skip("this OS does not report RssAnon/RssFile")
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(b"\x01" * MiB)
    with open(path, "rb") as f, measure() as mapped:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        total = sum(view[i] for i in range(0, len(view), 4096))  # touch every page
        time.sleep(0.05)  # let the sampler see them resident
        view.close()
    assert total == 256 * MiB // 4096
    assert mapped.peak_file_bytes == pytest.approx(256 * MiB, rel=0.05), format_size(mapped.peak_file_bytes)
    assert mapped.peak_anon_bytes < 16 * MiB, format_size(mapped.peak_anon_bytes)

    with measure() as tensor:
        x = torch.ones(256 * MiB, dtype=torch.uint8)
        time.sleep(0.05)
        del x
    assert tensor.peak_anon_bytes == pytest.approx(256 * MiB, rel=0.05), format_size(tensor.peak_anon_bytes)
    assert tensor.peak_file_bytes < 16 * MiB, format_size(tensor.peak_file_bytes)
    assert str(tensor).startswith("CPU peak +")  # the printed form is unchanged


@pytest.mark.cuda
def test_measure_cuda_peak_of_a_known_allocation_within_2_percent():
    import torch

    with measure() as m:
        x = torch.empty(300 * MiB + 12345, dtype=torch.uint8, device="cuda")
        del x
    assert m.cuda_peak_bytes == pytest.approx(300 * MiB + 12345, rel=0.02), format_size(m.cuda_peak_bytes)


@pytest.mark.cuda
def test_cuda_context_bytes_is_measured():
    import torch

    from helpers.memory import cuda_context_bytes

    probe = cuda_context_bytes(details=True)
    assert probe["outside_torch"] == probe["used_after_first_ops"] - probe["reserved_by_torch"]
    assert 0 < probe["outside_torch"] < probe["total"]
    assert probe["total"] == torch.cuda.mem_get_info(0)[1]


@pytest.mark.cuda
def test_cuda_context_bytes_leaves_out_what_this_process_holds():
    """The probe's context only: this process's own context and 2 GiB of its tensors are not counted."""
    import torch

    from helpers.memory import cuda_context_bytes

    held = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    probe = cuda_context_bytes(details=True)
    assert probe["in_use_before"] >= held.numel()
    assert 0 < probe["outside_torch"] < held.numel(), format_size(probe["outside_torch"])
    del held


def test_cuda_context_bytes_without_cuda_or_bad_device():
    import torch

    from helpers.memory import cuda_context_bytes

    with pytest.raises(ValueError, match="device -1 must be a CUDA device index"):
        cuda_context_bytes(-1)
    if not torch.cuda.is_available():
        assert cuda_context_bytes() is None


def test_a_peak_counter_that_does_not_reset_makes_measure_sample_and_say_so(monkeypatch):
    """Some sandboxed kernels accept the write to clear_refs and keep the old VmHWM: measure() must not report it."""
    from helpers import memory

    if memory._read_status_kib("VmHWM") is None:
        pytest.skip("no VmHWM on this OS: measure() samples anyway")
    monkeypatch.setattr(memory, "_CLEAR_REFS", type("Accepts", (), {"write_text": lambda self, text: None})())
    real = memory._read_status_kib
    monkeypatch.setattr(memory, "_read_status_kib",
                        lambda key: real(key) + 2**30 if key == "VmHWM" else real(key))  # an old, 1 GiB higher peak
    monkeypatch.setattr(memory, "_said", set())
    with pytest.warns(RuntimeWarning, match="keeps the old peak"):
        with measure() as m:
            pass
    assert m.method == "sampling" and m.cpu_peak_bytes < 2**30
