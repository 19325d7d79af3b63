import inspect

import pytest

from helpers.show import Source, show


def sample(values):
    """A function of this file's own, so that these tests do not depend on any helpers module's lines."""
    total = 0
    for v in values:
        total += v
    return total


def test_show_is_the_source_in_text_and_highlighted_in_html():
    s = show(sample)
    assert isinstance(s, Source)
    assert repr(s) == inspect.getsource(sample).rstrip("\n")  # the whole function, first line to last
    html = s._repr_html_()
    assert f"{__name__}.sample" in html and "<span" in html and "<style" not in html


def test_show_excerpt_marks_what_it_leaves_out():
    assert repr(show(sample, "total +=")).splitlines() == ["...", "        total += v", "..."]
    assert repr(show(sample, "def sample", "return")).splitlines() == \
        ["def sample(values):", "...", "    return total"]  # nothing left out after the last line: no mark


def test_show_says_when_a_needle_matches_nothing():
    with pytest.raises(ValueError, match=f"no line of {__name__}.sample contains 'not there'"):
        show(sample, "not there")
    with pytest.raises(TypeError, match="needs a function"):
        show(len)
