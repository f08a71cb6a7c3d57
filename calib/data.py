"""Text sources for calibration and evaluation, and seeded token sampling.

Sources, by name:

* ``wiki-calib`` / ``wiki-eval`` (the offline default): the Wikipedia articles that the PyPI package
  ``gensim`` ships in ``gensim/test/test_data``. Articles longer than 2000 characters after wiki
  markup removal are kept (100 of them); even-indexed ones form the evaluation half, odd-indexed
  ones the calibration half, so the halves never share an article.
* ``lee``: gensim's ``lee_background.cor`` (300 Australian news articles), an out-of-domain text.
* a local file: ``.txt`` (read as is), ``.json``/``.jsonl``/``.parquet`` (a ``text`` column, read
  with ``datasets``).
* a Hugging Face dataset, when the hub is reachable: ``wikitext2``, ``c4``, ``pile-val`` or any
  ``datasets`` id written as ``hf:<path>[:<config>[:<split>[:<column>]]]``.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "HUB_DATASETS",
    "calibration_samples",
    "load_text",
    "read_json_lines",
    "token_stream",
    "wikipedia_articles",
]

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILE = "lee_background.cor"
_MIN_ARTICLE_CHARS = 2000
_GENSIM_HINT = "pip install gensim"


@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    split: str
    column: str


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext2-test": HubDataset("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": HubDataset("allenai/c4", "en", "validation", "text"),
    "pile-val": HubDataset("mit-han-lab/pile-val-backup", None, "validation", "text"),
}


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the offline default text comes from the 'gensim' package; install it with: "
            f"{_GENSIM_HINT}"
        )
    return Path(spec.origin).parent / "test" / "test_data"


_HEADING = re.compile(r"^(=+)\s*(.*?)\s*(=+)\s*$", flags=re.MULTILINE)


@functools.lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[str, ...]:
    """Cleaned articles (in file order) from gensim's shortened English Wikipedia dump."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_test_data() / _WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall gensim ({_GENSIM_HINT})")
    articles: list[str] = []
    with bz2.BZ2File(path) as f:
        for _title, text, _pageid in extract_pages(f):
            clean = filter_wiki(text).replace("'''", "").replace("''", "")
            # WikiText writes section headings as " == Title == "; do the same.
            clean = _HEADING.sub(lambda m: f" {m.group(1)} {m.group(2)} {m.group(3)} ", clean)
            if len(clean) > _MIN_ARTICLE_CHARS:
                articles.append(clean.strip())
    return tuple(articles)


def _wiki_half(split: str) -> str:
    parity = 0 if split == "eval" else 1
    return "\n\n".join(a for i, a in enumerate(wikipedia_articles()) if i % 2 == parity)


def _hub_text(ds: HubDataset) -> str:
    import datasets

    try:
        data = datasets.load_dataset(ds.path, ds.config, split=ds.split)
    except Exception as exc:  # datasets raises many types for offline / missing data
        raise ConnectionError(
            f"could not load dataset {ds.path!r} ({ds.config}, {ds.split}) from the Hugging Face "
            f"hub: {exc}. Offline, use 'wiki-calib' / 'wiki-eval' or a local file."
        ) from exc
    if ds.column not in data.column_names:
        raise ValueError(f"dataset {ds.path!r} has no column {ds.column!r}: {data.column_names}")
    return "\n\n".join(t for t in data[ds.column] if t and t.strip())


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".cor", ".raw"):
        return path.read_text(encoding="utf-8", errors="replace")
    if suffix in (".json", ".jsonl"):
        texts = _json_texts(path)
    elif suffix == ".parquet":
        texts = _parquet_texts(path)
    else:
        raise ValueError(
            f"{path}: unsupported text file type {suffix!r} (use .txt, .json, .jsonl or .parquet)"
        )
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise ValueError(f"{path}: no text (the file or its 'text' values are empty)")
    return text


def read_json_lines(path: Path, text: str | None = None) -> list[Any]:
    """The values of a JSON-lines file (blank lines skipped; ``text``: its content, if already
    read); a line that is not JSON is a ``ValueError`` naming the file and the line."""
    if text is None:
        text = path.read_text(encoding="utf-8")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
    return rows


def _json_texts(path: Path) -> list[str]:
    """The ``text`` values of a JSON file: a list of objects, or JSON lines (one object per
    line); each error names the file and the line."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise ValueError(f"{path}: empty file, no text")
    try:
        rows = json.loads(raw)
    except json.JSONDecodeError:
        rows = read_json_lines(path, raw)
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected JSON objects with a 'text' field")
    texts = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "text" not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}: record {n} has no 'text' field (found {found})")
        value = row["text"]
        if not isinstance(value, str):
            raise ValueError(f"{path}: record {n}: 'text' must be a string")
        texts.append(value)
    return texts


def _parquet_texts(path: Path) -> list[str]:
    import datasets

    try:
        data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets/pyarrow raise many types for a damaged file
        raise ValueError(f"{path}: cannot read it as parquet: {exc}") from exc
    if "text" not in data.column_names:
        raise ValueError(f"{path}: expected a 'text' column, found {data.column_names}")
    return [t for t in data["text"] if isinstance(t, str)]


def load_text(source: str) -> str:
    """Return the text of a named source, a local file, or a hub dataset (see module docstring)."""
    if source in ("wiki-calib", "wiki-eval"):
        return _wiki_half(source.split("-")[1])
    if source == "lee":
        path = _gensim_test_data() / _LEE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; reinstall gensim ({_GENSIM_HINT})")
        return path.read_text(encoding="utf-8")
    if source in HUB_DATASETS:
        return _hub_text(HUB_DATASETS[source])
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        ds = HubDataset(
            parts[0],
            parts[1] if len(parts) > 1 and parts[1] else None,
            parts[2] if len(parts) > 2 else "train",
            parts[3] if len(parts) > 3 else "text",
        )
        return _hub_text(ds)
    path = Path(source)
    if path.exists() or path.suffix:
        return _file_text(path)
    raise ValueError(
        f"unknown text source {source!r}: use wiki-calib, wiki-eval, lee, "
        f"{', '.join(HUB_DATASETS)}, hf:<dataset id>, or a path to a .txt/.json/.jsonl/.parquet "
        "file"
    )


def token_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text into one 1-D int64 tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(
    tokenizer: Any, source: str, n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens drawn at seeded random offsets.

    Returns:
        int64 tensor ``[n_samples, seq_len]``.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    tokens = token_stream(tokenizer, load_text(source))
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"calibration text {source!r} has {tokens.numel()} tokens, fewer than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
