"""helpers: the small library behind the book *Bigger than the machine*.

One module per chapter; each public function's docstring names the chapter that builds it.

* ``helpers.memory``  – memory probes and size strings (chapter 00)
* ``helpers.models``  – the book model, offline, and synthetic Llama checkpoints (chapter 00)
* ``helpers.environment`` – what machine the numbers came from (chapter 00)
"""

__version__ = "0.1.0"
