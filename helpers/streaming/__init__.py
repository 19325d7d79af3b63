"""Layer streaming: run a model bigger than memory one block at a time, the whole batch per block.

Built in chapter 08, in three parts:

* ``engine``: ``stream_pass``, the loop (wait for a block's weights, run the batch through it, release it, while
  the next block is read), and what hangs on it: a ``BlockSource`` (the blocks of a checkpoint read in place or
  of a per-layer split, through ``helpers.reader.BlockReader``), ``Resident`` blocks, and observers
  (``BlockTimeline``, ``Progress``);
* ``llama``: the adapter, everything that touches transformers (the skeleton on ``meta``, each block's ``Role``,
  rotary embeddings, masks, the KV cache, a decoder layer's call), for the Llama family;
* ``streamer``: ``LayerStreamer``, the three put together, with ``forward``, ``generate``, ``score`` and
  ``score_many`` as policies over the engine;
* ``bnb``: checkpoints bitsandbytes saved in 4 or 8 bits, read in place (``BnB4bit``, ``BnB8bit``: ``helpers.quant``
  codecs), and ``check_quantization``, which refuses the quantized formats the streamer cannot decode.
"""

from .bnb import BnB4bit, BnB8bit, check_quantization
from .engine import BlockSource, BlockTimeline, Observer, Progress, Resident, stream_pass
from .llama import SUPPORTED_MODEL_TYPES, Block, Llama, Role, check_architecture, llama_blocks
from .streamer import LayerStreamer, choose_resident, group_in_order, pick, predicted_peak_bytes

__all__ = ["stream_pass", "BlockSource", "Resident", "Observer", "BlockTimeline", "Progress",
           "SUPPORTED_MODEL_TYPES", "check_architecture", "Role", "Block", "llama_blocks", "Llama",
           "LayerStreamer", "choose_resident", "group_in_order", "pick", "predicted_peak_bytes", "BnB4bit",
           "BnB8bit", "check_quantization"]
