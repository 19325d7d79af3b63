"""helpers: the small library behind the book *Bigger than the machine*.

Every public function and class names, in its docstring, the chapter that builds it. The modules stand in
layers (checked by ``lint-imports``): the ground floor imports no chapter, and a chapter's module imports
only the ground floor and earlier chapters.

The ground floor:

* ``helpers.tensorfiles`` – safetensors files read and written, atomic publishing, cache keys
* ``helpers.layout``      – where a model's blocks lie on disk: naming, the tied head, the split rule, the formats
* ``helpers.reader``      – one block reader: direct, buffered or mapped reads into reused slots, copies to a GPU

The chapters:

* ``helpers.memory``      – memory probes and size strings (chapter 00)
* ``helpers.models``      – the book model, offline, and synthetic Llama checkpoints (chapter 00)
* ``helpers.environment`` – what machine the numbers came from, and every chapter's version check (chapter 00)
* ``helpers.show``        – every chapter's way of showing source code (chapter 00)
* ``helpers.meta``        – counting and inspecting models on the meta device (chapter 01)
* ``helpers.arithmetic``  – memory arithmetic: parameters, weights, KV cache, activations (chapter 02)
* ``helpers.checkpoints`` – safetensors by hand, inspection, validation, per-layer split (chapter 03)
* ``helpers.device_map``  – a device-map planner that agrees with accelerate (chapter 04)
* ``helpers.hooks``       – the hooks that run a dispatched model: prefetcher, timeline (chapter 05)
* ``helpers.dispatch``    – CPU and disk offload: check, plan, materialise, attach (chapter 05)
* ``helpers.quant``       – int8 and NF4/FP4 quantizers that match bitsandbytes; the codecs of compressed splits
  (chapters 06 and 08)
* ``helpers.attention``   – naive and tiled (flash) attention (chapter 07)
* ``helpers.streaming``   – layer streaming: the engine, the Llama adapter, ``LayerStreamer`` (chapter 08)
* ``helpers.bench``       – chapter 08's benchmark, ``python -m helpers.streaming_benchmark``
"""

__version__ = "0.1.0"
