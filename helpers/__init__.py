"""helpers: the small library behind the book *Bigger than the machine*.

One module per chapter; each public function's docstring names the chapter that builds it.

* ``helpers.memory``      – memory probes and size strings (chapter 00)
* ``helpers.models``      – the book model, offline, and synthetic Llama checkpoints (chapter 00)
* ``helpers.environment`` – what machine the numbers came from, and every chapter's version check (chapter 00)
* ``helpers.show``        – every chapter's way of showing source code (chapter 00)
* ``helpers.tensorfiles`` – safetensors files read and written, atomic publishing, cache keys (the ground floor)
* ``helpers.meta``        – counting and inspecting models on the meta device (chapter 01)
* ``helpers.arithmetic``  – memory arithmetic: parameters, weights, KV cache, activations (chapter 02)
* ``helpers.checkpoints`` – safetensors by hand, inspection, validation, per-layer split (chapter 03)
* ``helpers.device_map``  – a device-map planner that agrees with accelerate (chapter 04)
* ``helpers.dispatch``    – hooks that run a model with CPU- or disk-offloaded weights (chapter 05)
* ``helpers.quant``       – int8 and NF4/FP4 quantizers that match bitsandbytes (chapter 06)
* ``helpers.attention``   – naive and tiled (flash) attention (chapter 07)
* ``helpers.streaming``   – layer-by-layer streaming of models bigger than memory (chapter 08)
* ``helpers.streaming_benchmark`` – chapter 08's benchmark, ``python -m helpers.streaming_benchmark``
"""

__version__ = "0.1.0"
