import inspect

import pytest

from helpers.show import Source, show, version_of


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


def test_show_excerpt_marks_what_it_leaves_out_and_names_its_version():
    stamp = f"# in {version_of(sample)}, {__name__}.sample reads:"
    assert repr(show(sample, "total +=")).splitlines() == [stamp, "...", "        total += v", "..."]
    assert repr(show(sample, "def sample", "return")).splitlines() == \
        [stamp, "def sample(values):", "...", "    return total"]  # nothing left out after the last line: no mark


def test_a_needle_that_matches_nothing_is_said_not_raised():
    lines = repr(show(sample, "total +=", "not there")).splitlines()
    assert lines[1:4] == ["...", "        total += v", "..."]
    assert lines[-1].startswith("# no line of this version contains 'not there'")
    with pytest.raises(TypeError, match="needs a function"):
        show(len)


def test_version_of_names_the_distribution_and_its_version():
    import transformers
    from transformers import PreTrainedModel

    assert version_of(PreTrainedModel) == f"transformers {transformers.__version__}"
    assert version_of(transformers) == f"transformers {transformers.__version__}"
