"""Pair data: the shipped template set, published layouts, the hub path, the split."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from quantlab.calib import pairs as pairs_mod
from quantlab.calib.pairs import (
    SentencePair,
    load_pairs,
    shipped_pairs_path,
    split_pairs,
    target_swap_pairs,
)

REPO = Path(__file__).resolve().parents[2]


CONFIRMATION = shipped_pairs_path().with_name("quantlab_pairs_confirmation.jsonl")


def _rows() -> list[dict]:
    lines = shipped_pairs_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_shipped_set_is_what_the_build_script_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "build_fair_pairs", REPO / "scripts" / "build_fair_pairs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pairs.jsonl"
    assert module.main(["--out", str(out)]) == 0
    assert out.read_bytes() == shipped_pairs_path().read_bytes()
    confirmation = tmp_path / "confirmation.jsonl"
    assert module.main(["--confirmation", "--out", str(confirmation)]) == 0
    assert confirmation.read_bytes() == CONFIRMATION.read_bytes()


def test_confirmation_set_uses_frames_of_its_own() -> None:
    main, extra = load_pairs(), load_pairs(str(CONFIRMATION))
    assert len(extra) == 12 * 40 and {p.bias_type for p in extra} == {"gender"}
    assert Counter(p.order for p in extra) == {"attribute-first": 320, "group-first": 160}

    def frame(p: SentencePair) -> str:
        return p.stereo.replace(p.target, "#")

    assert not {frame(p) for p in extra} & {frame(p) for p in main if p.target}
    assert not {p.template for p in extra} & {p.template for p in main}


def test_shipped_set_contents() -> None:
    pairs = load_pairs()
    assert len(pairs) == 1224
    assert Counter(p.bias_type for p in pairs) == {"gender": 800, "race-color": 360, "religion": 64}
    assert Counter(p.order for p in pairs) == {"attribute-first": 728, "group-first": 496}
    assert len({p.pair_id for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.stereo != p.anti and p.direction in ("stereo", "antistereo")
        # A minimal pair: exactly one word differs (names, pronouns and religions are single words).
        a, b = p.stereo.split(), p.anti.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
    # Race and religion are balanced between negative (stereo) and positive (antistereo) contexts,
    # in each template order.
    for cat in ("race-color", "religion"):
        for order in ("attribute-first", "group-first"):
            directions = Counter(
                p.direction for p in pairs if p.bias_type == cat and p.order == order
            )
            assert directions["stereo"] == directions["antistereo"]


def test_gender_direction_follows_the_occupation_statistics() -> None:
    male = {"he", "He", "him", "his", "brother", "man", "uncle"}
    female = {"she", "She", "her", "sister", "woman", "aunt"}
    for row in _rows():
        if row["bias_type"] != "gender":
            continue
        words = {w.strip(".,") for w in row["sent_more"].split()}
        majority_male = row["pct_female"] < 50
        assert row["pct_female"] <= 22 or row["pct_female"] >= 70
        assert words & (male if majority_male else female), row
        assert not words & (female if majority_male else male), row


def test_race_and_religion_directions() -> None:
    black_names = {"Darnell", "Lakisha", "Tyrone", "Tanisha", "Jamal", "Ebony"}
    for row in _rows():
        more = set(row["sent_more"].strip(".").split())
        if row["bias_type"] == "race-color" and more & black_names:
            assert row["stereo_antistereo"] == "stereo"  # only negative contexts name them first
        if row["bias_type"] == "religion":
            muslim_first = "Muslim" in more
            assert muslim_first == (row["stereo_antistereo"] == "stereo")


def test_split_is_by_template_balanced_and_order_free() -> None:
    pairs = load_pairs()
    calib, held = split_pairs(pairs, "calib"), split_pairs(pairs, "heldout")
    assert len(calib) + len(held) == len(pairs)
    assert not {p.template for p in calib} & {p.template for p in held}
    for key in {(p.bias_type, p.direction, p.order) for p in pairs}:
        n_calib = sum((p.bias_type, p.direction, p.order) == key for p in calib)
        n_held = sum((p.bias_type, p.direction, p.order) == key for p in held)
        assert n_calib == n_held, key  # every template of the shipped set has the same size
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    assert {p.pair_id for p in split_pairs(shuffled, "heldout")} == {p.pair_id for p in held}
    assert split_pairs(pairs, "all") == pairs
    with pytest.raises(ValueError, match="split must be one of"):
        split_pairs(pairs, "test")


CROWS_HEADER = (
    ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators"
)


def test_crows_pairs_csv_layout(tmp_path: Path) -> None:
    path = tmp_path / "crows_pairs_anonymized.csv"
    path.write_text(
        CROWS_HEADER
        + "\n"
        + '0,"Alice, the clerk, was quiet.","Bob, the clerk, was quiet.",stereo,gender,'
        + "\"[['gender']]\",a0,\"['a1']\"\n"
        + '1,The old man was slow.,The young man was slow.,antistereo,age,"[[\'age\']]",a1,"[]"\n',
        encoding="utf-8",
    )
    pairs = load_pairs(str(path))
    assert pairs[0] == SentencePair(
        stereo="Alice, the clerk, was quiet.",
        anti="Bob, the clerk, was quiet.",
        bias_type="gender",
        template="0",
        pair_id="0",
        direction="stereo",
        source="crows_pairs_anonymized",
    )
    assert pairs[1].direction == "antistereo" and pairs[1].bias_type == "age"


def test_stereoset_json_layout(tmp_path: Path) -> None:
    item = {
        "id": "abc",
        "target": "chess player",
        "bias_type": "profession",
        "context": "The chess player was BLANK.",
        "sentences": [
            {
                "sentence": "The chess player was fox.",
                "id": "1",
                "labels": [],
                "gold_label": "unrelated",
            },
            {
                "sentence": "The chess player was nerdy.",
                "id": "2",
                "labels": [],
                "gold_label": "stereotype",
            },
            {
                "sentence": "The chess player was sporty.",
                "id": "3",
                "labels": [],
                "gold_label": "anti-stereotype",
            },
        ],
    }
    path = tmp_path / "dev.json"
    path.write_text(
        json.dumps({"version": "1.0", "data": {"intrasentence": [item], "intersentence": []}})
    )
    (pair,) = load_pairs(str(path))
    assert (pair.stereo, pair.anti, pair.template, pair.bias_type) == (
        "The chess player was nerdy.",
        "The chess player was sporty.",
        "abc",
        "profession",
    )
    item["sentences"] = item["sentences"][:2]
    path.write_text(json.dumps({"data": {"intrasentence": [item]}}))
    with pytest.raises(ValueError, match="anti-stereotype"):
        load_pairs(str(path))


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pair file not found"):
        load_pairs(str(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("sent_more,sent_less,bias_type\na,b,gender\n")
    with pytest.raises(ValueError, match=r"missing CrowS-Pairs columns \['stereo_antistereo'\]"):
        load_pairs(str(bad))
    same = tmp_path / "same.jsonl"
    row = {"sent_more": "x y", "sent_less": "x y", "stereo_antistereo": "stereo", "bias_type": "g"}
    same.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="the same sentence"):
        load_pairs(str(same))
    row["sent_less"], row["stereo_antistereo"] = "x z", "pro"
    same.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="stereo_antistereo must be one of"):
        load_pairs(str(same))
    same.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_pairs(str(same))
    parquet = tmp_path / "pairs.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unsupported pair file type"):
        load_pairs(str(parquet))
    with pytest.raises(ValueError, match="unknown pair source"):
        load_pairs("winobias")


def test_hub_sources_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for source in ("crows-pairs", "stereoset"):
        with pytest.raises(ConnectionError, match="Offline, use the shipped 'quantlab' pairs"):
            load_pairs(source)


def test_hub_layouts_with_class_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub copies store labels as ClassLabel integers; they must come back as names."""
    import datasets

    crows = datasets.Dataset.from_dict(
        {
            "id": [0, 1],
            "sent_more": ["Women can't drive.", "Old people are wise."],
            "sent_less": ["Men can't drive.", "Young people are wise."],
            "stereo_antistereo": [0, 1],
            "bias_type": [2, 8],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("int32"),
                "sent_more": datasets.Value("string"),
                "sent_less": datasets.Value("string"),
                "stereo_antistereo": datasets.ClassLabel(names=["stereo", "antistereo"]),
                "bias_type": datasets.ClassLabel(
                    names=[
                        "race-color",
                        "socioeconomic",
                        "gender",
                        "disability",
                        "nationality",
                        "sexual-orientation",
                        "physical-appearance",
                        "religion",
                        "age",
                    ]
                ),
            }
        ),
    )
    stereoset = datasets.Dataset.from_dict(
        {
            "id": ["x1"],
            "target": ["Muslim"],
            "bias_type": ["religion"],
            "context": ["He is a BLANK person."],
            "sentences": [
                {
                    "sentence": [
                        "He is a violent person.",
                        "He is a peaceful person.",
                        "He is a tea person.",
                    ],
                    "id": ["a", "b", "c"],
                    "gold_label": [1, 0, 2],
                }
            ],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "target": datasets.Value("string"),
                "bias_type": datasets.Value("string"),
                "context": datasets.Value("string"),
                "sentences": {
                    "sentence": datasets.Sequence(datasets.Value("string")),
                    "id": datasets.Sequence(datasets.Value("string")),
                    "gold_label": datasets.Sequence(
                        datasets.ClassLabel(names=["anti-stereotype", "stereotype", "unrelated"])
                    ),
                },
            }
        ),
    )
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, config=None, split=None: crows if "crows" in path else stereoset,
    )
    got = load_pairs("crows-pairs")
    assert [(p.direction, p.bias_type) for p in got] == [
        ("stereo", "gender"),
        ("antistereo", "age"),
    ]
    (pair,) = load_pairs("stereoset")
    assert (pair.stereo, pair.anti) == ("He is a violent person.", "He is a peaceful person.")
    assert pairs_mod.PAIR_SOURCES == ("quantlab", "stereoset", "crows-pairs")


def test_target_swap_pairs_keep_the_group_word_and_swap_the_stereotyped_target() -> None:
    rows = {p.pair_id: p for p in load_pairs("quantlab")}
    half = split_pairs(list(rows.values()), "calib")
    swapped = target_swap_pairs(half)
    # Every gender row of the half finds a partner (20 male- and 20 female-majority occupations per
    # template); race and religion rows name their groups without a target word and yield none.
    assert len(swapped) == sum(p.bias_type == "gender" for p in half)
    assert {p.bias_type for p in swapped} == {"gender"}
    for pair in swapped:
        first_id, second_id = pair.pair_id.split("~")
        first, second = rows[first_id], rows[second_id]
        assert pair.stereo == first.stereo and pair.anti == second.anti
        assert first.template == second.template == pair.template
        # The same group word: the two sentences agree once each one's target is masked ...
        masked = [
            s.replace(f"an {t}", "#").replace(f"a {t}", "#").replace(t, "#")
            for s, t in ((pair.stereo, first.target), (pair.anti, second.target))
        ]
        assert masked[0] == masked[1]
        # ... and the targets are stereotyped the other way (the first row's stereotypical
        # sentence names the group of the second row's anti-stereotypical one).
        assert first.target != second.target
    assert len({p.pair_id for p in swapped}) == len(swapped)
    # Pairs without targets (external sources) give nothing.
    plain = [SentencePair("He is rude.", "She is rude.", "gender", "t", "0")]
    assert target_swap_pairs(plain) == []
