from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantlab.calib.data import calibration_samples, load_text, wikipedia_articles


class CharTokenizer:
    """Deterministic stand-in tokenizer: one token per character."""

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_wiki_halves_are_disjoint_and_cover_the_articles() -> None:
    articles = wikipedia_articles()
    assert len(articles) == 100
    calib, evalt = load_text("wiki-calib"), load_text("wiki-eval")
    assert 1.4e6 < len(evalt) < 1.6e6 and 1.5e6 < len(calib) < 1.7e6
    for i, article in enumerate(articles):
        probe = article[len(article) // 2 : len(article) // 2 + 200]
        home, other = (evalt, calib) if i % 2 == 0 else (calib, evalt)
        assert probe in home
        assert probe not in other


def test_calibration_samples_are_seeded() -> None:
    tok = CharTokenizer()
    a = calibration_samples(tok, "lee", 4, 64, seed=3)
    b = calibration_samples(tok, "lee", 4, 64, seed=3)
    c = calibration_samples(tok, "lee", 4, 64, seed=4)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_local_files(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 10)
    assert load_text(str(txt)).startswith("hello world")
    js = tmp_path / "a.jsonl"
    js.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)))
    assert load_text(str(js)) == "line 0\n\nline 1\n\nline 2"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"body": "x"}))
    with pytest.raises(
        ValueError, match=r"b\.jsonl: record 1 has no 'text' field \(found \['body'\]\)"
    ):
        load_text(str(bad))
    listed = tmp_path / "c.json"
    listed.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert load_text(str(listed)) == "one\n\ntwo"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.jsonl", "", r"empty\.jsonl: empty file, no text"),
        ("blank.json", "\n\n", r"blank\.json: empty file, no text"),
        ("broken.jsonl", '{"text": "a"}\n{oops\n', r"broken\.jsonl: line 2 is not valid JSON"),
        ("number.json", "42", r"number\.json: expected JSON objects with a 'text' field"),
        ("texts.jsonl", '{"text": 5}\n', r"texts\.jsonl: record 1: 'text' must be a string"),
        ("only-empty.jsonl", '{"text": ""}\n', r"only-empty\.jsonl: no text"),
        ("bad.parquet", "not parquet", r"bad\.parquet: cannot read it as parquet"),
    ],
)
def test_bad_text_files_are_named(tmp_path: Path, name: str, content: str, match: str) -> None:
    """Each used to crash (StopIteration for an empty .jsonl, datasets' own errors otherwise)."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_text(str(path))


def test_unknown_and_missing_sources_are_named() -> None:
    with pytest.raises(ValueError, match="unknown text source 'nonsense'"):
        load_text("nonsense")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text("/nonexistent/missing.txt")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibration_samples(CharTokenizer(), "lee", 1, 10**7)


def test_hub_dataset_offline_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="could not load dataset 'wikitext'"):
        load_text("wikitext2")
