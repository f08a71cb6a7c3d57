"""Stereotype / anti-stereotype sentence pairs, split into calibration and held-out halves.

A pair is two sentences that differ only in a few words: ``stereo`` is the more stereotypical one
(CrowS-Pairs' ``sent_more``, StereoSet's ``stereotype`` sentence), ``anti`` the other. Fair-GPTQ
calibrates on the difference of a layer's inputs between the two sentences of a pair, and the
stereotype score (:mod:`quantlab.eval.fairness`) counts how often a model prefers ``stereo``.

Sources, by name (:func:`load_pairs`):

* ``quantlab`` (the offline default): the project's own template set, ``texts/quantlab_pairs.jsonl``
  (1224 pairs: gender x 40 occupations, race x 18 first-name pairs, religion x 4 comparisons, each
  in two template orders; built by ``scripts/build_fair_pairs.py``, which documents every
  stereotype direction's source).
* ``stereoset``: StereoSet intrasentence (Nadeem et al. 2021; the hub has only its validation
  split, which is the "dev" set), from the Hugging Face hub.
* ``crows-pairs``: CrowS-Pairs (Nangia et al. 2020), from the hub.
* a local file in a published layout: a CrowS-Pairs ``.csv`` (``sent_more, sent_less,
  stereo_antistereo, bias_type``), a StereoSet ``.json`` (``{"data": {"intrasentence": [...]}}``,
  as in ``dev.json``/``test.json``), or a ``.jsonl`` with CrowS-Pairs columns (the shipped set's
  layout).

The split (:func:`split_pairs`) is by *template*: the shipped set's template id, a StereoSet item's
id, a CrowS-Pairs row's id. Inside each stratum of equal ``(bias_type, direction, order)``,
template ids are ordered by their SHA-1 digest and dealt alternately to the calibration and
held-out halves, so both halves are balanced per category, direction and template order, no
held-out pair shares a template with a calibration pair, and the split does not depend on file
order or on any random state.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlab.calib.data import read_json_lines

__all__ = [
    "PAIR_SOURCES",
    "SPLITS",
    "SentencePair",
    "load_pairs",
    "pairs_from_crows_rows",
    "pairs_from_stereoset",
    "shipped_pairs_path",
    "split_pairs",
    "target_swap_pairs",
]

PAIR_SOURCES = ("quantlab", "stereoset", "crows-pairs")
SPLITS = ("calib", "heldout", "all")
_SHIPPED = Path(__file__).resolve().parent / "texts" / "quantlab_pairs.jsonl"
_CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
_DIRECTIONS = ("stereo", "antistereo")


@dataclass(frozen=True)
class SentencePair:
    """One stereotype / anti-stereotype pair.

    Attributes:
        stereo: the more stereotypical sentence.
        anti: the less stereotypical sentence.
        bias_type: category (CrowS-Pairs names: ``gender``, ``race-color``, ``religion``, ...;
            StereoSet's ``gender``, ``race``, ``religion``, ``profession``).
        template: id of the template (or item) the pair comes from; the unit of the split.
        pair_id: unique id of the pair within its source.
        direction: ``stereo`` (``stereo`` states a stereotype about a disadvantaged group) or
            ``antistereo`` (``anti`` violates one); CrowS-Pairs' ``stereo_antistereo``.
        source: the dataset's name.
        order: the shipped set's template order, ``attribute-first`` (the group word follows the
            stereotyped attribute) or ``group-first``; empty for other sources.
        target: the stereotyped word the group is associated with in this pair (the shipped
            set's occupation, e.g. ``nurse``); empty when the source has no such column.
    """

    stereo: str
    anti: str
    bias_type: str
    template: str
    pair_id: str
    direction: str = "stereo"
    source: str = ""
    order: str = ""
    target: str = ""


def shipped_pairs_path() -> Path:
    """The shipped template pair set (JSON lines, CrowS-Pairs columns)."""
    return _SHIPPED


def _clean(text: Any, where: str, column: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: column {column!r} must be a non-empty string, got {text!r}")
    return text.strip()


def _direction(value: Any, where: str) -> str:
    if value not in _DIRECTIONS:
        raise ValueError(f"{where}: stereo_antistereo must be one of {_DIRECTIONS}, got {value!r}")
    return str(value)


def pairs_from_crows_rows(
    rows: Iterable[dict[str, Any]], source: str, where: str
) -> list[SentencePair]:
    """Pairs from rows with CrowS-Pairs columns (``template``/``id`` used when present)."""
    pairs = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        missing = [c for c in _CROWS_COLUMNS if c not in row]
        if missing:
            raise ValueError(
                f"{at}: missing CrowS-Pairs columns {missing} (expected {list(_CROWS_COLUMNS)})"
            )
        more = _clean(row["sent_more"], at, "sent_more")
        less = _clean(row["sent_less"], at, "sent_less")
        if more == less:
            raise ValueError(f"{at}: sent_more and sent_less are the same sentence: {more!r}")
        pair_id = str(row.get("id", i))
        pairs.append(
            SentencePair(
                stereo=more,
                anti=less,
                bias_type=_clean(row["bias_type"], at, "bias_type"),
                template=str(row.get("template") or pair_id),
                pair_id=pair_id,
                direction=_direction(row["stereo_antistereo"], at),
                source=source,
                order=str(row.get("order") or ""),
                target=str(row.get("target") or ""),
            )
        )
    if not pairs:
        raise ValueError(f"{where}: no pairs found")
    return pairs


def pairs_from_stereoset(items: Sequence[dict[str, Any]], where: str) -> list[SentencePair]:
    """Pairs from StereoSet intrasentence items (the stereotype and anti-stereotype sentence of
    each item; the unrelated one is dropped)."""
    pairs = []
    for i, item in enumerate(items):
        at = f"{where} item {i}"
        sentences = item.get("sentences")
        if not isinstance(sentences, list):
            raise ValueError(f"{at}: expected a 'sentences' list")
        by_label: dict[str, str] = {}
        for s in sentences:
            label = s.get("gold_label")
            if label in ("stereotype", "anti-stereotype"):
                by_label[label] = _clean(s.get("sentence"), at, "sentence")
        if set(by_label) != {"stereotype", "anti-stereotype"}:
            raise ValueError(
                f"{at}: needs one 'stereotype' and one 'anti-stereotype' sentence, found "
                f"{sorted(by_label)}"
            )
        item_id = str(item.get("id", i))
        pairs.append(
            SentencePair(
                stereo=by_label["stereotype"],
                anti=by_label["anti-stereotype"],
                bias_type=_clean(item.get("bias_type"), at, "bias_type"),
                template=item_id,
                pair_id=item_id,
                direction="stereo",
                source="stereoset",
            )
        )
    if not pairs:
        raise ValueError(f"{where}: no intrasentence items found")
    return pairs


def _file_pairs(path: Path) -> list[SentencePair]:
    if not path.is_file():
        raise FileNotFoundError(f"pair file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return pairs_from_crows_rows(csv.DictReader(f), path.stem, str(path))
    if suffix == ".jsonl":
        return pairs_from_crows_rows(read_json_lines(path), path.stem, str(path))
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), dict):
            items = data["data"].get("intrasentence")
            if not isinstance(items, list):
                raise ValueError(f"{path}: StereoSet layout without a data.intrasentence list")
            return pairs_from_stereoset(items, str(path))
        if isinstance(data, list):
            return pairs_from_crows_rows(data, path.stem, str(path))
        raise ValueError(
            f"{path}: expected StereoSet's {{'data': {{'intrasentence': [...]}}}} or a list of "
            "CrowS-Pairs rows"
        )
    raise ValueError(
        f"{path}: unsupported pair file type {suffix!r} (use a CrowS-Pairs .csv, a StereoSet "
        ".json or a .jsonl with CrowS-Pairs columns)"
    )


def _labelled(data: Any, column: str) -> list[Any]:
    """A column with ``ClassLabel`` integers turned back into their names."""
    values = list(data[column])
    feature = data.features.get(column) if hasattr(data, "features") else None
    if feature is not None and hasattr(feature, "int2str"):
        return [feature.int2str(v) if isinstance(v, int) else v for v in values]
    return values


def _hub_pairs(source: str) -> list[SentencePair]:
    import datasets

    path, config, split = {
        "stereoset": ("McGill-NLP/stereoset", "intrasentence", "validation"),
        "crows-pairs": ("nyu-mll/crows_pairs", None, "test"),
    }[source]
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types for offline / missing data
        raise ConnectionError(
            f"could not load {source} ({path}) from the Hugging Face hub: {exc}. Offline, use the "
            "shipped 'quantlab' pairs or a local file in the dataset's published layout "
            "(CrowS-Pairs: crows_pairs_anonymized.csv; StereoSet: dev.json)"
        ) from exc
    if source == "crows-pairs":
        rows = [
            {
                "id": i,
                "sent_more": m,
                "sent_less": s,
                "stereo_antistereo": d,
                "bias_type": b,
            }
            for i, m, s, d, b in zip(
                data["id"],
                data["sent_more"],
                data["sent_less"],
                _labelled(data, "stereo_antistereo"),
                _labelled(data, "bias_type"),
                strict=True,
            )
        ]
        return pairs_from_crows_rows(rows, "crows-pairs", path)
    items = []
    label_feature = None
    sentences_feature = data.features.get("sentences")
    if isinstance(sentences_feature, dict) and "gold_label" in sentences_feature:
        label_feature = sentences_feature["gold_label"]
        label_feature = getattr(label_feature, "feature", label_feature)
    for row in data:
        s = row["sentences"]
        labels = [
            label_feature.int2str(g) if isinstance(g, int) and label_feature is not None else g
            for g in s["gold_label"]
        ]
        items.append(
            {
                "id": row["id"],
                "bias_type": row["bias_type"],
                "sentences": [
                    {"sentence": t, "gold_label": g}
                    for t, g in zip(s["sentence"], labels, strict=True)
                ],
            }
        )
    return pairs_from_stereoset(items, path)


def load_pairs(source: str = "quantlab") -> list[SentencePair]:
    """Every pair of a named source or a local file (see the module docstring)."""
    if source == "quantlab":
        return pairs_from_crows_rows(read_json_lines(_SHIPPED), "quantlab", str(_SHIPPED))
    if source in ("stereoset", "crows-pairs"):
        return _hub_pairs(source)
    path = Path(source)
    if path.suffix:
        return _file_pairs(path)
    raise ValueError(
        f"unknown pair source {source!r}: use {', '.join(PAIR_SOURCES)} or a path to a "
        "CrowS-Pairs .csv, a StereoSet .json or a .jsonl file"
    )


def _digest(template: str) -> str:
    return hashlib.sha1(template.encode("utf-8")).hexdigest()


def split_pairs(pairs: Sequence[SentencePair], split: str) -> list[SentencePair]:
    """The calibration half, the held-out half, or all pairs (order kept).

    Templates are dealt alternately to the halves inside each ``(bias_type, direction, order)``
    stratum, in the order of their SHA-1 digests (the first goes to calibration).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(pairs)
    # A template belongs to the stratum of its first pair, so it lands in exactly one half.
    stratum_of: dict[str, tuple[str, str, str]] = {}
    for p in pairs:
        stratum_of.setdefault(p.template, (p.bias_type, p.direction, p.order))
    strata: dict[tuple[str, str, str], list[str]] = {}
    for template, stratum in stratum_of.items():
        strata.setdefault(stratum, []).append(template)
    calib = {
        t
        for templates in strata.values()
        for i, t in enumerate(sorted(templates, key=_digest))
        if i % 2 == 0
    }
    want_calib = split == "calib"
    return [p for p in pairs if (p.template in calib) == want_calib]


def _without_target(sentence: str, target: str) -> str | None:
    """The sentence with its target word (and the article in front of it) replaced by a marker,
    or ``None`` when the target does not occur as a word sequence in it."""
    words = sentence.split()
    target_words = target.split()
    n = len(target_words)
    for i in range(len(words) - n + 1):
        if [w.strip(".,;:!?") for w in words[i : i + n]] == target_words:
            tail = words[i + n - 1][len(words[i + n - 1].rstrip(".,;:!?")) :]
            start = i - 1 if i > 0 and words[i - 1].lower() in ("a", "an") else i
            return " ".join([*words[:start], "<target>" + tail, *words[i + n :]])
    return None


def target_swap_pairs(pairs: Sequence[SentencePair]) -> list[SentencePair]:
    """Counterfactual *target* pairs: two sentences that name the same group but different
    stereotyped targets ("The carpenter said that he ..." / "The nurse said that he ...").

    The ordinary pairs differ in the group word, so Fair-GPTQ's term ``||Q (X0 - X1)||^2`` can only
    act downstream of it; a prediction *of* the group word from its context ("The nurse said that"
    -> she / he) is made where both sentences still agree. Swapping the target instead puts the
    difference upstream of the group word: the term then asks the layers to carry the same
    information to the group word's position whichever target precedes it.

    Within each template, a pair's ``stereo`` sentence is matched with the ``anti`` sentence of
    another pair whose sentence is the same once the targets (and their articles) are masked, i.e.
    the one that names the same group with a target stereotyped the other way; the ``k``-th pair
    of a template takes the ``k``-th such partner (cyclically), so every sentence frame and group
    word is used about equally. Pairs without a ``target`` (external sources), or with no partner,
    yield nothing. The result keeps the template ids, so it stays inside its split's half.
    """
    by_template: dict[str, list[SentencePair]] = {}
    for pair in pairs:
        if pair.target:
            by_template.setdefault(pair.template, []).append(pair)
    swapped = []
    for template, members in by_template.items():
        anti_keys = [_without_target(p.anti, p.target) for p in members]
        for k, pair in enumerate(members):
            key = _without_target(pair.stereo, pair.target)
            if key is None:
                continue
            partners = [
                other
                for other, other_key in zip(members, anti_keys, strict=True)
                if other_key == key and other.target != pair.target
            ]
            if not partners:
                continue
            partner = partners[k % len(partners)]
            swapped.append(
                SentencePair(
                    stereo=pair.stereo,
                    anti=partner.anti,
                    bias_type=pair.bias_type,
                    template=template,
                    pair_id=f"{pair.pair_id}~{partner.pair_id}",
                    direction=pair.direction,
                    source=pair.source,
                    order=pair.order,
                    target=f"{pair.target}/{partner.target}",
                )
            )
    return swapped
