import pytest

from helpers import memory
from helpers.show import Source, show


def test_show_is_the_source_in_text_and_highlighted_in_html():
    s = show(memory.format_size)
    assert isinstance(s, Source)
    assert repr(s).startswith("def format_size(") and repr(s).endswith("raise AssertionError(\"unreachable\")")
    html = s._repr_html_()
    assert "helpers.memory.format_size" in html and "<span" in html and "<style" not in html


def test_show_excerpt_marks_what_it_leaves_out():
    text = repr(show(memory.format_size, "base, units"))
    assert text.splitlines() == ["...", "    base, units = (1024, [\"B\", \"KiB\", \"MiB\", \"GiB\", \"TiB\", \"PiB\"]) if binary else (", "..."]


def test_show_says_when_a_needle_matches_nothing():
    with pytest.raises(ValueError, match="no line of helpers.memory.format_size contains 'not there'"):
        show(memory.format_size, "not there")
    with pytest.raises(TypeError, match="needs a function"):
        show(len)
