"""Show source code in a chapter: highlighted in Jupyter and in the rendered book, plain text anywhere else.

Built in chapter 00; every chapter shows the ``helpers`` code it builds with ``show(obj)``.
"""

from __future__ import annotations

import inspect
from importlib import metadata

__all__ = ["Source", "show", "version_of"]


class Source:
    """Source text that renders as highlighted Python in HTML (notebook, book) and as itself in plain text.
    Built in chapter 00."""

    def __init__(self, text: str, title: str):
        self.text, self.title = text, title

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's text/plain: the source, not a repr
        printer.text(self.text)

    def _repr_html_(self) -> str:
        from html import escape

        try:
            from pygments import highlight
            from pygments.formatters import HtmlFormatter
            from pygments.lexers import PythonLexer
        except ImportError:  # pygments comes with IPython; without it, plain preformatted text
            return f"<pre>{escape(self.text)}</pre>"
        # inline styles (noclasses): no stylesheet to ship, nothing that restyles the rest of the page
        body = highlight(self.text, PythonLexer(), HtmlFormatter(noclasses=True, style="default"))
        return f'<details open><summary><code>{escape(self.title)}</code></summary>{body}</details>'


def version_of(obj) -> str:
    """``"transformers 5.24.0"``: the distribution that defines ``obj`` and its installed version, or its top-level
    module's name alone where no installed distribution provides it. Built in chapter 00."""
    module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        return f"{dist} {metadata.version(dist)}"
    return top


def show(obj, *needles: str) -> Source:
    """The source of ``obj`` (a function, class or module), or only its lines that contain one of ``needles``.

    Lines left out are marked ``...``, so an excerpt never reads as the whole. An excerpt names the version it was
    read from (``# in transformers 5.24.0: ...``), and a needle that matches nothing in this version is said in the
    excerpt, not raised: a chapter that quotes a library's line keeps running when a release rewords it.
    Built in chapter 00.
    """
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    if getattr(obj, "__module__", None) and not inspect.ismodule(obj):
        name = f"{obj.__module__}.{name}"
    try:
        lines, _ = inspect.getsourcelines(obj)
    except (TypeError, OSError) as e:
        raise TypeError(f"show() needs a function, class or module with source on disk; {name!r} has none ({e})") \
            from None
    if not needles:
        return Source("".join(lines).rstrip("\n"), name)
    out = [f"# in {version_of(obj)}, {name} reads:"]
    keep = [i for i, line in enumerate(lines) if any(n in line for n in needles)]
    previous = None
    for i in keep:
        if i > (-1 if previous is None else previous) + 1:  # lines left out before this one
            out.append("...")
        out.append(lines[i].rstrip("\n"))
        previous = i
    if keep and keep[-1] < len(lines) - 1:
        out.append("...")
    missing = [n for n in needles if not any(n in line for line in lines)]
    if missing:
        out.append(f"# no line of this version contains {', '.join(map(repr, missing))}: "
                   "the library has changed since the chapter was written")
    return Source("\n".join(out), f"{name}: the lines with {', '.join(map(repr, needles))}")
