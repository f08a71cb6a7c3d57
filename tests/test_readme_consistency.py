"""The README's results table says what the docs say: every figure in its bits/weight, wiki ppl and
peers columns appears in docs/ (where each has its command), to the README's precision. A figure
changed in the docs but not in the README (or quoted from nowhere) fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "| method | bits/weight | wiki ppl |"
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def readme_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADER)
    table = text[start : text.index("\n\n", start)].splitlines()
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in table[2:]]


def docs_numbers() -> list[str]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    return NUMBER.findall(text)


def in_docs(figure: str, numbers: list[str]) -> bool:
    """``figure`` (d decimals) is some docs number rounded to d decimals."""
    decimals = len(figure.split(".")[1])
    half = 0.5 * 10**-decimals + 1e-12
    return any(
        len(n.split(".")[1]) >= decimals and abs(float(n) - float(figure)) <= half for n in numbers
    )


def docs_table_rows() -> list[str]:
    return [
        line
        for p in sorted((ROOT / "docs").rglob("*.md"))
        for line in p.read_text().splitlines()
        if line.startswith("|")
    ]


def method_word(cell: str) -> str:
    """The method a README row is about (its first word: RTN, GPTQ, AWQ, PVQ, BitStack, ...)."""
    return re.split(r"[\s,]", cell, maxsplit=1)[0].lower()


def ppl_in_docs(method: str, figure: str, rows: list[str]) -> bool:
    """``figure`` is, rounded, a number of a docs table row that names ``method``."""
    return any(method in row.lower() and in_docs(figure, NUMBER.findall(row)) for row in rows)


def test_every_readme_figure_is_in_the_docs() -> None:
    rows = readme_rows()
    assert len(rows) >= 10  # the table was found whole
    numbers, tables = docs_numbers(), docs_table_rows()
    missing = []
    for cells in rows:
        # The method's own perplexity: in a docs table row about that method.
        ppl = NUMBER.findall(cells[2])
        assert len(ppl) == 1, cells
        if not ppl_in_docs(method_word(cells[0]), ppl[0], tables):
            missing.append(f"{cells[0]}: ppl {ppl[0]} in no docs table row naming the method")
        # Bits per weight and the peers' figures: somewhere in the docs.
        figures = NUMBER.findall(cells[1] + " " + cells[4])
        missing += [f"{cells[0]}: {f}" for f in figures if not in_docs(f, numbers)]
    assert not missing, "README figures the docs do not give:\n" + "\n".join(missing)


def test_the_check_catches_a_stale_figure() -> None:
    tables = docs_table_rows()
    assert ppl_in_docs("rtn", "25.66", tables)  # docs/results.md: quantlab | RTN asym | 25.659
    assert not ppl_in_docs("rtn", "25.61", tables)
    assert not ppl_in_docs("awq", "25.66", tables)
    assert not in_docs("25.66", ["25.6", "25.67"])  # too coarse a docs figure, another figure
