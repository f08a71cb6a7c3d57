"""A tiny deterministic tokenizer for Fair-GPTQ tests on random models (no real vocabulary)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

__all__ = ["WordTokenizer"]


class WordTokenizer:
    """Whitespace words -> ids by CRC32; words longer than 5 characters split into 4-character
    pieces, so two sentences can differ in a span of unequal token length ("Ann" / "Lakisha")."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int = 512) -> None:
        self.vocab_size = vocab_size

    def _piece(self, piece: str) -> int:
        return 3 + zlib.crc32(piece.encode()) % (self.vocab_size - 3)

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        ids: list[int] = []
        for word in text.split():
            pieces = [word] if len(word) <= 5 else [word[i : i + 4] for i in range(0, len(word), 4)]
            ids += [self._piece(p) for p in pieces]
        return {"input_ids": ids}

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """What a checkpoint needs to rebuild this tokenizer: its vocabulary size."""
        Path(directory, "word_tokenizer.json").write_text(
            json.dumps({"vocab_size": self.vocab_size})
        )
