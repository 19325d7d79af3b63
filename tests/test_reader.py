"""helpers.reader: one block reader for chapters 05 and 08. Every method reads the same bytes; direct reads round
their ranges out to the file system's alignment and still hand back exactly the bytes asked for; a refused
O_DIRECT falls back to buffered reads and says why; slots are reused in the order of reads."""

from __future__ import annotations

import errno
import mmap
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import reader as R
from helpers.layout import Piece, pieces_of
from helpers.reader import ALIGN, READS, BlockReader
from helpers.tensorfiles import CheckpointError, read_header

TENSORS = {"a.w": torch.randn(300, 77), "a.x": torch.randn(5000), "a.y": torch.randn(13).half(),
           "b.z": torch.randn(4097), "a.e": torch.zeros(0, 3), "a.i": torch.arange(11, dtype=torch.int32)}


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "shard.safetensors"
    save_file(TENSORS, path)
    return path


def block_a(path: Path) -> list[Piece]:
    """Every a.* tensor of the shard, as the fewest contiguous ranges (b.z sits between some of them)."""
    return pieces_of(read_header(path), {k: k[2:] for k in TENSORS if k.startswith("a.")})


@pytest.mark.parametrize("method", READS)
def test_every_method_reads_the_tensors_safetensors_reads(shard, method):
    want = load_file(shard)
    with BlockReader("cpu", read=method) as reader:
        for _ in range(3):  # the slots are reused from the second read on
            loaded = reader.load(block_a(shard))
            assert reader.method == method and loaded.bytes == sum(p.length for p in block_a(shard))
            assert set(loaded.state) == {k[2:] for k in TENSORS if k.startswith("a.")}
            for name, tensor in loaded.state.items():
                assert tensor.dtype == want[f"a.{name}"].dtype and torch.equal(tensor, want[f"a.{name}"]), name
            reader.release(loaded)
        ahead = reader.submit(block_a(shard)).result()  # the same in the reader's own thread
        assert ahead.thread.startswith("layer-reader") and torch.equal(ahead.state["w"], want["a.w"])


def test_direct_reads_keep_the_asked_bytes_at_every_alignment_edge(tmp_path):
    blob = torch.randint(0, 256, (3 * ALIGN + 123,), dtype=torch.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(blob.numpy().tobytes())
    tiny = tmp_path / "tiny.bin"  # a file shorter than one alignment unit
    tiny.write_bytes(blob[:100].numpy().tobytes())
    cases = [(path, 0, blob.numel()), (path, 5, 100), (path, ALIGN - 3, 10), (path, ALIGN, ALIGN),
             (path, blob.numel() - 1, 1), (path, 2 * ALIGN + 7, ALIGN + 116), (tiny, 0, 100), (tiny, 40, 60)]
    with BlockReader("cpu", read="direct") as reader:
        for file, start, length in cases:
            piece = Piece(file, start, length, {"raw": (torch.uint8, [length], 0)})
            loaded = reader.load([piece])
            expected = blob[start:start + length]
            assert torch.equal(loaded.state["raw"], expected), (file.name, start, length)
            assert loaded.slot.buffer.data_ptr() % ALIGN == 0  # O_DIRECT's rule for the buffer
            reader.release(loaded)
        assert reader.method == "direct"
        with pytest.raises(CheckpointError, match=rf"blob.bin: bytes \[{blob.numel() - 9:,}, {blob.numel() + 1:,}\)"):
            reader.load([Piece(path, blob.numel() - 9, 10, {"raw": (torch.uint8, [10], 0)})])


def test_a_refused_o_direct_falls_back_to_buffered_and_says_why(shard, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    assert "refuses O_DIRECT (EINVAL)" in R.direct_io_refusal(shard)
    with BlockReader("cpu", read="direct") as reader:
        with pytest.warns(RuntimeWarning, match="reads buffered, not direct.*refuses O_DIRECT"):
            loaded = reader.load(block_a(shard))
        assert reader.method == "buffered" and "EINVAL" in reader.why
        assert torch.equal(loaded.state["w"], TENSORS["a.w"])
        reader.release(loaded)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once: the next read falls back without a word
            reader.release(reader.load(block_a(shard)))


def test_slots_are_handed_out_in_the_order_of_reads(shard):
    with BlockReader("cpu", read="direct") as reader:
        first, second = reader.load(block_a(shard)), reader.load(block_a(shard))
        slot_1, slot_2 = first.slot, second.slot
        assert slot_1 is not slot_2  # two blocks held at once: two slots
        reader.release(first)
        third = reader.load(block_a(shard))
        assert third.slot is slot_1 and third.number == 3  # the one given back, not the one in use
        reader.release(second)
        reader.release(third)
        fourth = reader.load(block_a(shard))
        assert fourth.slot is slot_2  # given back longest ago: consecutive reads never share a slot
        assert reader.slot_bytes == 2 * slot_2.buffer.numel()
    assert reader.slot_bytes == 0 and reader.closed
    with pytest.raises(RuntimeError, match="closed"):
        reader.load(block_a(shard))


def test_a_lookup_table_reads_only_its_rows_pages(tmp_path):
    table = torch.randn(4096, 64)  # 256 bytes a row: 16 rows to a page
    path = tmp_path / "table.safetensors"
    save_file({"weight": table}, path)
    (piece,) = pieces_of(read_header(path), {"weight": "weight"})
    with BlockReader("cpu", read="direct") as reader:
        loaded = reader.load([piece], rows=torch.tensor([0, 1, 2000]))
    assert loaded.bytes <= 3 * mmap.PAGESIZE < piece.length
    assert torch.equal(loaded.state["weight"][2000], table[2000])


def test_bad_arguments_are_refused_before_any_read():
    with pytest.raises(ValueError, match=r"read 'mmap' must be one of 'direct', 'buffered', 'map'"):
        BlockReader("cpu", read="mmap")
    with pytest.raises(ValueError, match="in_flight 0 must be an int >= 1"):
        BlockReader("cpu", in_flight=0)


def test_dispatch_and_the_streamer_read_through_the_one_reader():
    """Neither chapter 05 nor chapter 08 keeps pinned buffers, CUDA streams or file reads of its own."""
    import helpers

    root = Path(helpers.__file__).parent
    for module in ["dispatch.py", "hooks.py", *(f"streaming/{p.name}" for p in (root / "streaming").glob("*.py"))]:
        text = (root / module).read_text()
        for own in ("pin_memory", "cuda.Stream(", "os.open(", "readinto(", "read_range(", "map_range(", "preadv("):
            assert own not in text, (module, own)
    assert "BlockReader(" in (root / "hooks.py").read_text() and "BlockReader(" in \
        (root / "streaming" / "engine.py").read_text()


@pytest.mark.cuda
def test_cuda_reads_equal_cpu_reads_and_reuse_pinned_slots(shard):
    with BlockReader("cuda", read="direct") as reader:
        loads = [reader.load(block_a(shard)) for _ in range(2)]
        for loaded in loads:
            assert loaded.event is not None and loaded.slot is None  # the slot went back once its copy was queued
            loaded.event.synchronize()
            assert all(t.device.type == "cuda" for t in loaded.state.values())
            assert torch.equal(loaded.state["w"].cpu(), TENSORS["a.w"])
        assert reader.slot_bytes > 0 and all(s.buffer.is_pinned() for s in reader._slots)
        done = torch.cuda.Event()
        done.record()
        for loaded in loads:
            reader.release(loaded, after=done)
    assert reader.slot_bytes == 0


@pytest.mark.cuda
def test_cuda_a_third_read_waits_for_the_first_blocks_compute_not_the_device(shard):
    """Events order the streams: load n waits (in the reader's thread) for load n - 2's compute event."""
    with BlockReader("cuda") as reader:
        first = reader.load(block_a(shard))
        second = reader.load(block_a(shard))
        waited = []

        class Event:
            def synchronize(self):
                waited.append(1)

        reader.release(first, after=Event())
        reader.release(second)
        reader.load(block_a(shard))
        assert waited == [1]


def test_slots_are_made_at_the_size_asked_and_never_grow(shard):
    """With slot_bytes, every slot has that size from the start: a bigger block never makes a slot grow (which
    would hold the old slot and the new one at once)."""
    big = R.slot_size(block_a(shard))
    with BlockReader("cpu", read="direct", slot_bytes=big) as reader:
        small = Piece(shard, 0, 8, {"raw": (torch.uint8, [8], 0)})
        first = reader.load([small])
        assert first.slot.buffer.numel() == big
        buffer = first.slot.buffer
        reader.release(first)
        second = reader.load(block_a(shard))
        assert second.slot.buffer is buffer  # the same memory, not a new allocation


@pytest.mark.skipif("parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="the one-core rule applies where torch's threads are OpenMP's (per thread)")
def test_the_readers_threads_compute_on_one_core_and_leave_the_callers_threads_alone(shard):
    """A reader thread with an OpenMP team of its own would slow every small op of the compute thread."""
    before, seen = torch.get_num_threads(), []

    def transform(state):
        seen.append(torch.get_num_threads())
        return state

    with BlockReader("cpu", read="buffered") as reader:
        reader.release(reader.submit(block_a(shard), transform=transform).result())
    assert seen == [1] and torch.get_num_threads() == before
