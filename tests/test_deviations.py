"""Task cards' ``deviations`` and ``variant_of`` (issue 19 items 1, 7, 8): parsing, errors, the shipped catalogue's rule
(every ImageNet-scale card states its deviations), and that the metadata never touches a record's protocol."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from prosmin_bench import cards
from prosmin_bench.errors import CardError
from prosmin_bench.reported import PAPER_CONSTANTS
from prosmin_bench.tasks import catalogue, get_task_spec
from prosmin_bench.tasks.base import Deviation, build_task

CARD_HEAD = """
    name = "{name}"
    kind = "linear"
    version = 1
    suite = "mini"
    main_score = "top1"
    {top}

    [datasets]
    train = "digits:train"
    test = "digits:test"

    [protocol]
    epochs = 5
"""

ONE = """
    [[deviations]]
    field = "training views"
    paper = "RandomResizedCrop + flip (eval_linear.py:85-90)"
    ours = "cached centre-crop features"
    why = "fast"
"""


def _card(folder: Path, name: str, top: str = "", tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(CARD_HEAD.format(name=name, top=top)) + textwrap.dedent(tail))
    return path


def _spec(tmp_path: Path, name: str, top: str = "", tail: str = ""):
    _card(tmp_path, name, top, tail)
    cards.add_card_dir(tmp_path)
    return get_task_spec(name)


def test_deviations_parse_into_frozen_records(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "dev_two", tail=ONE + ONE.replace("training views", "lr").replace("fast", "no test"))
    assert spec.deviations == (
        Deviation("training views", "RandomResizedCrop + flip (eval_linear.py:85-90)", "cached centre-crop features",
                  "fast"),
        Deviation("lr", "RandomResizedCrop + flip (eval_linear.py:85-90)", "cached centre-crop features", "no test"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.deviations[0].why = "x"  # type: ignore[misc]
    assert spec.deviations[1].as_dict() == {"field": "lr", "paper": "RandomResizedCrop + flip (eval_linear.py:85-90)",
                                            "ours": "cached centre-crop features", "why": "no test"}


def test_empty_deviations_mean_the_papers_protocol_and_absent_means_unstated(tmp_path: Path) -> None:
    _card(tmp_path, "dev_none", "deviations = []")
    _card(tmp_path, "dev_unstated")
    cards.add_card_dir(tmp_path)
    assert get_task_spec("dev_none").deviations == ()
    assert get_task_spec("dev_unstated").deviations is None
    assert get_task_spec("dev_unstated").variant_of is None


@pytest.mark.parametrize("top, tail, message", [
    ("", ONE + ONE.replace('why = "fast"\n', ""), "deviations[1] is missing 'why'"),
    ("", ONE.replace('field = "training views"', 'field = ""'), "deviations[0].field must be a non-empty string"),
    ("", ONE.replace('why = "fast"', "why = 3"), "deviations[0].why must be a non-empty string"),
    ("", ONE.replace('why = "fast"', 'why = "fast"\nsource = "x"'), "deviations[0] has unknown key(s) ['source']"),
    ('deviations = ["cached features"]', "", "deviations[0] must be a table"),
    ('deviations = "cached features"', "", "field 'deviations' must be list"),
    ('variant_of = "bad_card"', "", "names the task itself"),
    ('variant_of = "../x"', "", "field 'variant_of' must be a plain name"),
    ("variant_of = 3", "", "field 'variant_of' must be str"),
])
def test_bad_deviations_and_variant_of_name_the_card_and_entry(tmp_path: Path, top: str, tail: str,
                                                                message: str) -> None:
    path = _card(tmp_path, "bad_card", top, tail)
    cards.add_card_dir(tmp_path)
    with pytest.raises(CardError) as err:
        catalogue()
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_every_shipped_imagenet_card_states_its_deviations() -> None:
    specs = dict(catalogue().items())
    missing = sorted(n for n, s in specs.items() if s.suite == "imagenet" and s.deviations is None)
    assert not missing, f"ImageNet-scale cards without a `deviations` field (use `deviations = []` for none): {missing}"
    for name, spec in specs.items():
        for d in spec.deviations or ():
            assert all(getattr(d, f.name).strip() for f in dataclasses.fields(d)), name


def test_every_variant_of_names_another_task_of_the_catalogue() -> None:
    specs = dict(catalogue().items())
    for name, spec in specs.items():
        if spec.variant_of is not None:
            assert spec.variant_of in specs and spec.variant_of != name, name
            base = specs[spec.variant_of]
            assert (base.suite, base.main_score) == (spec.suite, spec.main_score), name  # a gap needs one score


def test_deviations_and_variant_of_are_not_protocol_so_records_stay_reusable(tmp_path: Path) -> None:
    plain = _spec(tmp_path / "a", "same_task")
    cards.clear_card_dirs()
    annotated = _spec(tmp_path / "b", "same_task", 'variant_of = "digits_linear"', ONE)
    assert annotated.deviations and annotated.variant_of == "digits_linear"
    assert annotated.protocol == plain.protocol
    # reuse._existing_ok compares vars(build_task(spec).params) with the record's protocol
    assert vars(build_task(annotated).params) == vars(build_task(plain).params)
    assert not {"deviations", "variant_of"} & set(vars(build_task(annotated).params))


def test_the_papers_mce_is_read_as_corruption_error_everywhere() -> None:
    spec = get_task_spec("imagenet_c")
    assert "corruption error" in spec.description and "lower is better" in spec.description
    protocols = (Path(__file__).resolve().parent.parent / "docs" / "protocols.md").read_text(encoding="utf-8")
    assert "mean calibration error" in protocols and "corruption error" in protocols
    mce = [c.value for c in PAPER_CONSTANTS if c.metric == "mce"]
    # the range that makes the reading unambiguous: tens of percent, not an ECE of a few percent
    assert mce and min(mce) > 40 and max(mce) < 80
