"""What the benchmark prints, and the targets it holds each result to.

``print_table`` (the default mode: one row per variant, then the bound and the targets) and ``print_shape``
(the ``--shape`` mode: the streamed pass against its bound, memory against RAM, the 80-layer estimate). Both read
only the JSON report, so a committed result prints as it did when it was measured (rows a report lacks, such
as CPU seconds in older ones, are left out). Built in chapter 08.
"""

from __future__ import annotations

from helpers.memory import format_size

__all__ = ["TARGET_BOUND", "TARGET_OVERLAP", "TARGET_RSS", "TARGET_ANCHOR", "TARGET_AIRLLM", "TARGET_RAM_SHARE",
           "ANCHORS", "source_words", "met", "print_table", "print_shape"]

# streaming: at most this many x the bound and x the overlap floor; its peak RSS within this share of the prediction
TARGET_BOUND, TARGET_OVERLAP, TARGET_RSS = 1.10, 1.05, 0.15
TARGET_ANCHOR, TARGET_AIRLLM = 1.5, 5.0  # each disk-offload anchor, and AirLLM: at least this many x slower
TARGET_RAM_SHARE = 0.25  # --shape mode: the streamer's peak RSS at most this share of the machine's RAM
ANCHORS = {"accelerate-disk": ("accelerate_vs_stream", TARGET_ANCHOR),
           "transformers-disk": ("transformers_vs_stream", TARGET_ANCHOR),
           "airllm": ("airllm_vs_stream", TARGET_AIRLLM)}  # variant -> (report key, how many x slower it should be)


def source_words(source: str) -> str:
    """``--source`` in words, for a report's heading. Built in chapter 08."""
    return "in place from the checkpoint's shards" if source == "inplace" else "from a per-layer split"


def met(condition: bool) -> str:
    """A target's verdict: "met" or "NOT met". Built in chapter 08."""
    return "met" if condition else "NOT met"


def read_note(name: str, res: dict) -> str:
    """A read row's note: its cold bandwidth, what it cost this process's CPUs (total, and per GB read) where the
    report has it, and the method that ran where a block reader fell back. Built in chapter 08."""
    note = f"{res['bandwidth'] / 1e9:.2f} GB/s cold"
    if "cpu_seconds" in res:
        note += f", {res['cpu_seconds']:.2f} CPU-s ({res['cpu_seconds'] / (res['bytes'] / 1e9):.2f} CPU-s/GB)"
    if res.get("method") and f"({res['method']})" not in name:
        note += f"; ran {res['method']} (O_DIRECT refused here)"
    return note


def row_note(name: str, res: dict) -> str:
    """The note column of one variant's row in ``print_table``. Built in chapter 08."""
    note = read_note(name, res) if "bandwidth" in res else ""
    if "peak_cuda" in res:
        note = f"GPU peak {format_size(res['peak_cuda'])}"
    if name == "h2d":
        note = (f"host to GPU: pinned {res['pinned_bandwidth'] / 1e9:.2f} GB/s, pageable "
                f"{res['pageable_bandwidth'] / 1e9:.2f} GB/s ({format_size(res['bytes'])} copies)")
    if name == "overlap":
        note = (f"in-memory forward while a thread reads ({res['compute_seconds']:.2f} s to the forward's end); "
                f"host steal {res.get('steal_seconds', float('nan')):.2f} CPU-s")
    if name.startswith("stream") and "read" in res:
        note = (note + "; " if note else "") + f"reads {res['read']}"
    if "offload_folder_bytes" in res:
        note = (note + "; " if note else "") + f"wrote {format_size(res['offload_folder_bytes'])} to offload_folder"
    if res.get("shards_mapped"):
        note += f"; keeps {res['shards_mapped']} shard(s) mapped: their pages stay cached, passes not all cold"
    return note


def print_targets(r: dict) -> None:
    """The default mode's bound and targets, after the table. Built in chapter 08."""
    bound = r["bound"]
    if r.get("device", "cpu") == "cuda":
        t = r["bound_terms"]
        print(f"\nbound = max(bytes / disk bandwidth {t['disk']:.3f} s, bytes / pinned H2D bandwidth {t['h2d']:.3f} s, "
              f"in-memory compute {t['compute']:.3f} s) = {bound:.3f} s per pass")
    else:
        print(f"\nbound = max(bytes / disk bandwidth, in-memory compute) = {bound:.2f} s per pass")
    print(f"streaming with prefetch: {r['stream_vs_bound']:.2f} × the bound "
          f"(target <= {TARGET_BOUND} ×: {met(r['stream_vs_bound'] <= TARGET_BOUND)})")
    if "stream_vs_overlap" in r:
        print(f"  and {r['stream_vs_overlap']:.2f} × the overlap floor, the in-memory forward while reading the same "
              f"files: what perfect overlap gives on this machine (target <= {TARGET_OVERLAP} ×: "
              f"{met(r['stream_vs_overlap'] <= TARGET_OVERLAP)})")
    for name, (key, target) in ANCHORS.items():
        if key in r:
            print(f"{name} is {r[key]:.2f} × slower than streaming (target >= {target:g} ×: {met(r[key] >= target)})")
    if "cuda_peak_vs_predicted" in r:
        print(f"streaming GPU peak {format_size(r['results']['stream-prefetch']['peak_cuda'])} vs predicted "
              f"{format_size(r['predicted_stream_rss'])} (two consecutive blocks + activations): "
              f"{(r['cuda_peak_vs_predicted'] - 1) * 100:+.1f} % (no target on CUDA: the whole embedding is read "
              "there, not only the rows a pass looks up)")
    if "rss_vs_predicted" in r:
        held = "two consecutive blocks" if r.get("read", "map") == "map" else "the reader's two slots"
        print(f"streaming peak RSS {format_size(r['results']['stream-prefetch']['peak_rss'])} vs predicted "
              f"{format_size(r['predicted_stream_rss'])} ({held} + activations): "
              f"{(r['rss_vs_predicted'] - 1) * 100:+.1f} % (target within ±{TARGET_RSS * 100:.0f} %: "
              f"{met(abs(r['rss_vs_predicted'] - 1) <= TARGET_RSS)})")


def print_table(r: dict) -> None:
    """The table the chapter shows: one row per variant, then the bound and the targets. Built in chapter 08."""
    device = r.get("device", "cpu")
    print(f"\nsynthetic Llama, {r['config']['num_hidden_layers']} layers, {format_size(r['weights_bytes'])} of "
          f"{r['dtype']} weights; batch {r['batch']} x {r['seq']} tokens; best of {r['rounds']} interleaved round(s); "
          f"streamed {source_words(r.get('source', 'split'))}; computed on {r.get('device_name', device)}")
    print(f"{'variant':<22}{'s / pass':>12}{'vs bound':>10}{'peak RSS':>14}   note")
    bound = r.get("bound")
    for name, res in r["results"].items():
        if "error" in res:
            print(f"{name:<22}{'-':>12}{'-':>10}{'-':>14}   failed: {res['error']}")
            continue
        ratio = f"{res['seconds'] / bound:.2f} ×" if bound and not name.startswith(("read", "h2d")) else ""
        rss = format_size(res["peak_rss"]) if "peak_rss" in res else ""
        print(f"{name:<22}{res['seconds']:>10.2f} s{ratio:>10}{rss:>14}   {row_note(name, res)}")
    if "airllm" not in r["results"]:
        print(f"{'airllm':<22}{'-':>12}{'-':>10}{'-':>14}   not installed (optional extra: make bench-airllm)")
    if bound is None:
        print("targets: not computed (a variant failed)")
        return
    print_targets(r)


def print_shape(r: dict) -> None:
    """The ``--shape`` mode's summary: the streamed pass against its bound, memory against RAM, the 80-layer
    estimate. Built in chapter 08."""
    m = r["machine"]
    print(f"\n{r['shape']} shapes, {r['layers']} decoder layers, {format_size(r['weights_bytes'])} of {r['dtype']} "
          f"weights ({'bigger' if r['bigger_than_ram'] else 'NOT bigger'} than {format_size(r['ram_total'])} of RAM); "
          f"batch {r['batch']} x {r['seq']} tokens; streamed cold {source_words(r['source'])}; {m['cpu']}, "
          f"{m['cores']} cores; written in {r['write_seconds']:.0f} s")
    res = r["results"]
    for name, x in res.items():
        if "error" in x:
            print(f"{name:<22} failed: {x['error']}")
        elif name.startswith("read"):
            print(f"{name:<22}{x['seconds']:>9.2f} s   {read_note(name, x)} ({format_size(x['bytes'])})")
        elif name == "layer":
            print(f"{'one layer in memory':<22}{x['seconds']:>9.2f} s   forward of one decoder layer "
                  f"({format_size(x['bytes'])})")
        else:
            times = ", ".join(f"{t:.1f}" for t in x["times"])
            print(f"{'streaming (prefetch)':<22}{x['seconds']:>9.2f} s   per pass ({times} s; the first warms up), "
                  f"{format_size(x['bytes_per_pass'])} read, peak RSS {format_size(x['peak_rss'])}")
    if "bound" in r:
        t = r["bound_terms"]
        print(f"\nbound = max(bytes / disk bandwidth {t['disk']:.2f} s, {r['layers']} x one layer's compute + embed/"
              f"norm/head {t['compute']:.2f} s) = {r['bound']:.2f} s per pass")
        print(f"streaming with prefetch: {r['stream_vs_bound']:.2f} × the bound (target <= {TARGET_BOUND} ×: "
              f"{met(r['stream_vs_bound'] <= TARGET_BOUND)})")
    if "rss_of_ram" in r:
        print(f"streaming peak RSS {format_size(res['shape-stream']['peak_rss'])} = {r['rss_of_ram']:.3f} of RAM "
              f"(target <= {TARGET_RAM_SHARE}: {met(r['rss_of_ram'] <= TARGET_RAM_SHARE)})")
    x = r.get("extrapolation")
    if x:
        ar = x["arithmetic_fp16"]
        print(f"\nextrapolated to {x['layers']} layers: {format_size(x['bytes_per_pass'])} read per pass "
              f"(the chapter's arithmetic: {format_size(ar['weights_bytes'])} of weights, "
              f"{format_size(ar['layer_bytes'])} a layer; "
              f"measured {format_size(x['layer_bytes'])}); read {x['read_seconds']:.0f} s, compute "
              f"{x['compute_seconds']:.0f} s -> about {x['pass_seconds']:.0f} s per pass")
        if "bound" in x:
            print(f"  bound for {x['layers']} layers: max(disk {x['bound_terms']['disk']:.0f} s, compute "
                  f"{x['bound_terms']['compute']:.0f} s) = {x['bound']:.0f} s per pass")
