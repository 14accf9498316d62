"""The typed model card: a malformed card is refused naming the field; risk levels are all reachable."""

import json
import shutil
from pathlib import Path

import pytest

from oncolens.zoo import BUILTIN_DIR, ModelPackage, PackageError
from oncolens.zoo.card import SCHEMA_VERSION, CardError, RiskLevel, parse_card, prune_levels, upgrade_card

SHIPPED = BUILTIN_DIR / "oral-photo"


def shipped() -> dict:
    return json.loads((SHIPPED / "card.json").read_text())


def with_three_levels(card: dict) -> dict:
    """The card with a fixed low / borderline / high policy ('high' from 0.5), whatever the package's is."""
    card["risk_policy"]["levels"] = [
        {"level": "low", "min": 0.0, "recommendation": "a"},
        {"level": "borderline", "min": 0.1, "recommendation": "b"},
        {"level": "high", "min": 0.5, "recommendation": "d"},
    ]
    return card


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c.pop("classes"), "classes: Field required"),
        (lambda c: c["calibration"].update(temperature=0), "calibration.temperature: Input should be greater than 0"),
        (lambda c: c["input"].update(std=[0.5, 0.0, 0.5]), "input.std: every std must be positive"),
        (
            lambda c: c["input"].update(resize="stretch"),
            "input.resize: Input should be 'squash', 'center_crop' or 'pad'",
        ),
        (lambda c: c["risk_policy"]["levels"][1].update(level="urgent"), "risk_policy.levels.1.level"),
        (lambda c: c.update(sha256="xyz"), "sha256: String should match pattern"),
        (lambda c: c["classes"][0].update(malignant=False), "no class is marked malignant"),
        (lambda c: c.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda c: c["aggregation"].update(rule="median"), "aggregation.rule"),
    ],
)
def test_a_malformed_card_is_refused_naming_the_field(change: object, named: str) -> None:
    card = shipped()
    change(card)  # type: ignore[operator]
    with pytest.raises(CardError, match="does not follow the model-card contract") as refused:
        parse_card(card)
    assert named in str(refused.value)


def test_a_level_that_could_never_be_returned_is_refused() -> None:
    card = with_three_levels(shipped())
    levels = card["risk_policy"]["levels"]
    levels.insert(2, {"level": "moderate", "min": levels[2]["min"], "recommendation": "never seen"})
    with pytest.raises(CardError, match=r"thresholds must rise strictly: high starts at 0\.5, not above moderate"):
        parse_card(card)


def test_a_schema_1_card_is_upgraded_without_its_unreachable_levels() -> None:
    old = with_three_levels(shipped())
    del old["schema_version"]
    old["risk_policy"]["levels"].insert(2, {"level": "moderate", "min": 0.5, "recommendation": "never seen"})
    upgraded = upgrade_card(old)
    assert upgraded["schema_version"] == SCHEMA_VERSION
    assert [lv["level"] for lv in upgraded["risk_policy"]["levels"]] == ["low", "borderline", "high"]
    assert (
        "Left out as unreachable (its threshold equals the next level's): moderate."
        in upgraded["risk_policy"]["reasoning"]
    )
    assert parse_card(upgraded).risk_policy.level_for(0.5).level == RiskLevel.high


def test_prune_levels_keeps_the_first_level_at_zero_and_drops_only_empty_bands() -> None:
    levels = [
        {"level": "low", "min": 0.0, "recommendation": "a"},
        {"level": "borderline", "min": 0.0, "recommendation": "b"},
        {"level": "moderate", "min": 0.4, "recommendation": "c"},
        {"level": "high", "min": 0.9, "recommendation": "d"},
    ]
    kept, dropped = prune_levels(levels)
    assert dropped == ["low"] and [lv["level"] for lv in kept] == ["borderline", "moderate", "high"]
    assert kept[0]["min"] == 0.0


def test_a_package_with_a_bad_card_does_not_load(tmp_path: Path) -> None:
    package = shutil.copytree(SHIPPED, tmp_path / "oral-photo")
    card = shipped()
    card["input"]["size"] = 8
    (package / "card.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match=r"input\.size: Input should be greater than or equal to 32"):
        ModelPackage.load(package)


def test_indeterminate_is_an_answer_not_a_level_a_policy_may_list() -> None:
    card = shipped()
    card["risk_policy"]["levels"][-1]["level"] = "indeterminate"
    with pytest.raises(CardError, match="'indeterminate' is the answer for out-of-domain images"):
        parse_card(card)
