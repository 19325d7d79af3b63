"""What the rendered book shows of each chapter's code stays readable: the lesson, not the plumbing (README, the
``tests/`` row). A code cell is shown unless it is tagged hide-input, remove-input or remove-cell; the
hidden ones still run (nbval executes every cell) and stay visible on Colab."""

import json
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))
HIDDEN = {"hide-input", "remove-input", "remove-cell"}
MAX_COLUMNS = 90          # wider lines overflow the rendered book's code column
MAX_CELL_LINES = 30
MAX_CHAPTER_LINES = 300

pytestmark = pytest.mark.skipif(not CHAPTERS, reason="the chapters are not beside the tests (not a checkout)")


def shown_cells(chapter: Path) -> dict[int, list[str]]:
    cells = json.loads(chapter.read_text())["cells"]
    return {i: "".join(c["source"]).splitlines() for i, c in enumerate(cells)
            if c["cell_type"] == "code" and not HIDDEN & set(c["metadata"].get("tags", []))}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_shown_code_fits_the_page(chapter):
    cells = shown_cells(chapter)
    wide = [(i, len(line)) for i, lines in cells.items() for line in lines if len(line) > MAX_COLUMNS]
    assert not wide, f"(cell, columns) of shown lines over {MAX_COLUMNS} columns: {wide}"
    long = {i: len(lines) for i, lines in cells.items() if len(lines) > MAX_CELL_LINES}
    assert not long, f"shown cells over {MAX_CELL_LINES} lines: {long}"
    total = sum(len(lines) for lines in cells.values())
    assert total <= MAX_CHAPTER_LINES, f"{total} shown lines of code, at most {MAX_CHAPTER_LINES}"
