"""MkDocs hook: pages generated from the repository at build time (no network).

* ``models/<id>.md``: one page per shipped model, from its ``card.json``.
* ``api/reference.md`` and ``api/openapi.json``: the API reference, from the server's OpenAPI document.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).parents[1]
ZOO = ROOT / "src" / "oncolens" / "zoo"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _interval(card: dict[str, Any], name: str) -> str:
    found = card["metrics"].get("intervals", {}).get(name)
    return f" ({found[0]:.3f}–{found[1]:.3f})" if isinstance(found, list) and len(found) == 2 else ""


def served_build(training: dict[str, Any]) -> list[str]:
    """Which build answers and what it cost: the ensemble against its one-network build, by the recipe's rule."""
    ensemble = training.get("ensemble") if training.get("method") == "ensemble" else None
    record = ensemble or training.get("ensemble_candidate")
    if not record:
        return ["- Serves: one network"]
    cost, val = record["cost"], record["val"]
    mine, single = val["ensemble"], val["one_network"]
    kind = f"an ensemble of {record['members']} tails on one shared front, one graph"
    lines = [
        f"- Serves: {kind if ensemble else 'one network (the ensemble below lost the rule)'}",
        f"- Rule, fixed in the recipe before the run: {record['rule']}",
        f"- Cost (one image, p50, same run): ensemble {cost['p50_ms']} ms, one-network build "
        f"{cost['one_network_p50_ms']} ms ({cost['ratio']}x; budget {cost['max_ratio']}x)",
        f"- Val (calibrated): ensemble NLL {mine['nll']:.3f}, macro AUROC {mine['macro_auc']:.3f}; "
        f"one network NLL {single['nll']:.3f}, macro AUROC {single['macro_auc']:.3f}",
        f"- Members combined by {record['combine']} (val NLL {record['combine_val_nll']}), "
        f"views {record['test_time_views']}",
    ]
    if ensemble:
        lines.append(
            f"- The one-network build v{record['one_network']['version']} is kept in `one-network/` "
            "(`ONCOLENS_ONE_NETWORK` serves it)"
        )
    return lines


def model_page(card: dict[str, Any]) -> str:
    metrics, dataset, training = card["metrics"], card.get("dataset", {}), card.get("training", {})
    malignant = metrics.get("malignant", {})
    lines = [
        f"# {card['title']}",
        "",
        f"`{card['id']}` version {card['version']} · {card.get('modality', '')} · {card.get('organ', '')}",
        "",
        '!!! warning "Decision support, not a diagnosis"',
        f"    {card.get('disclaimer', '')}",
        "",
        "## Intended use",
        "",
        card.get("intended_use", ""),
        "",
    ]
    if card.get("use_for"):
        lines += [f"Use it for: {card['use_for']}", ""]
    lines += ["## Classes", "", "| class | name | counted as malignant | description |", "|---|---|---|---|"]
    lines += [
        f"| `{c['id']}` | {c['name']} | {'yes' if c.get('malignant') else 'no'} | {c.get('description', '')} |"
        for c in card["classes"]
    ]
    lines += [
        "",
        f"## How good it is (the `{metrics.get('split', 'test')}` split, {metrics.get('n', '?')} images)",
        "",
        "95% bootstrap intervals in brackets. The named class is the arg-max of the calibrated probabilities.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for name, label in [
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("macro_f1", "macro F1"),
        ("macro_auc", "macro AUROC"),
        ("ece", "expected calibration error"),
    ]:
        if metrics.get(name) is not None:
            lines.append(f"| {label} | {_pct(metrics[name])}{_interval(card, name)} |")
    for name, label in [("auc", "malignant-vs-rest AUROC"), ("sensitivity", "sensitivity at the call"),
                        ("specificity", "specificity at the call")]:  # fmt: skip
        if malignant.get(name) is not None:
            found = malignant.get("intervals", {}).get(name)
            span = f" ({found[0]:.3f}–{found[1]:.3f})" if isinstance(found, list) and len(found) == 2 else ""
            lines.append(f"| {label} | {_pct(malignant[name])}{span} |")
    lines += ["", "## Risk levels (operating points)", ""]
    lines += [
        f"The score is {card.get('score_label') or 'P(malignant)'}; each level starts at its lower border "
        "(chosen on val) and states what it meant on the test images.",
        "",
        "| level | from | basis | test: malignant at or above | test: benign at or above | recommendation |",
        "|---|---|---|---|---|---|",
    ]
    for level in card["risk_policy"]["levels"]:
        test = level.get("test") or {}
        lines.append(
            f"| {level['level']} | {level['min']:.3f} | {level.get('basis', '')} | "
            f"{_pct(test.get('malignant_at_or_above'))} | {_pct(test.get('benign_at_or_above'))} | "
            f"{level['recommendation']} |"
        )
    lines += ["", "## Limitations", ""]
    limits = card.get("limitations", [])
    lines += [f"- {item}" for item in (limits if isinstance(limits, list) else [limits])]
    calibration = card.get("calibration", {})
    lines += [
        "",
        "## How it was built",
        "",
        f"- Dataset: {dataset.get('name', '')} — {dataset.get('license', '')}",
        f"- Citation: {dataset.get('citation', '')}",
        f"- Counts: {json.dumps(dataset.get('counts', {}))}",
        f"- Backbone: {training.get('backbone', '')}, image size {training.get('image_size', '')}, "
        f"seed {training.get('seed', '')}, wall time {training.get('wall_time_s', '?')} s",
        f"- Calibration: {calibration.get('method', '')}, temperature {calibration.get('temperature', '?'):.3f}, "
        f"fitted on {calibration.get('fitted_on', 'val')}",
        f"- Method: {training.get('method', 'train')}; machine: {training.get('machine', '')}",
        *served_build(training),
        f"- Rebuilt by: `{training.get('command', '')}`",
        f"- sha256 of `model.onnx`: `{card.get('sha256', '')}`",
        "",
        "The experiment history behind this package is on [Models: how they were built](index.md).",
        "",
    ]
    return "\n".join(lines)


def api_reference() -> tuple[str, str]:
    from oncolens.app import create_app
    from oncolens.config import Settings

    with tempfile.TemporaryDirectory() as data:
        schema = create_app(Settings(data_dir=Path(data), preload_models=False, web_enabled=False)).openapi()
    lines = [
        "# API reference",
        "",
        f"{schema['info']['title']} {schema['info']['version']}, generated from the server's OpenAPI document "
        "([openapi.json](openapi.json); a running server serves it at `/openapi.json` and as Swagger UI at `/docs`).",
        "",
    ]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            lines += [f"## `{method.upper()} {path}`", "", operation.get("summary", ""), ""]
            if operation.get("description"):
                lines += [operation["description"].strip(), ""]
            parameters = operation.get("parameters", [])
            if parameters:
                lines += ["| parameter | in | required | description |", "|---|---|---|---|"]
                for p in parameters:
                    text = (p.get("description") or "").replace("\n", " ").replace("|", "\\|")
                    lines.append(f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | {text} |")
                lines.append("")
            codes = ", ".join(
                f"{code} {r.get('description', '')}" for code, r in operation.get("responses", {}).items()
            )
            lines += [f"Responses: {codes}", ""]
    return "\n".join(lines), json.dumps(schema, indent=1)


def on_files(files: Files, config: Any) -> Files:
    for card_file in sorted(ZOO.glob("*/card.json")):
        card = json.loads(card_file.read_text())
        files.append(File.generated(config, f"models/{card['id']}.md", content=model_page(card)))
    reference, schema = api_reference()
    files.append(File.generated(config, "api/reference.md", content=reference))
    files.append(File.generated(config, "api/openapi.json", content=schema))
    return files
