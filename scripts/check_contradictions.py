"""Does every answer agree with itself? Runs a dataset folder's images through the HTTP API.

For every image of the split (default ``test``) it posts the image to ``/api/v1/models/{id}/predict``
and counts a contradiction when

* the named class (``top_class``) is not the class with the highest probability returned beside it, or
* the risk level is not the card's level for the returned P(malignant) (an in-domain image), or
* an indeterminate answer names a risk level other than ``indeterminate``.

For the first ``--cases`` images it also stores a case and checks that the web result page, the PDF
report (``pdftotext``) and the FHIR conclusion carry the API's ``statement`` verbatim (the one
sentence that names the class and the level); a server too old to have ``statement`` is reported as
such. The server runs in this process (FastAPI's TestClient) on a temporary SQLite database, with
the models installed in this checkout.

    python scripts/check_contradictions.py ../shared/datasets/skin-ham10000
    python scripts/check_contradictions.py ../shared/datasets/*/ --cases 5 --json runs/contradictions.json

The model is the folder's name unless ``--model`` says otherwise. Exit status 1 when any
contradiction was found.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import Session

from oncolens.accounts.auth import hash_password
from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.evaluation.datasets import drop_labels, read_manifest, select_split
from oncolens.store.db.models import User
from oncolens.zoo.card import RiskPolicy

PASSWORD = "contradiction-check-password-1"
CLASS_KEY = "named class is not the arg-max"
LEVEL_KEY = "risk level is not the card's"
CASE_KEY = "case and image disagree"


def normalised(text: str) -> str:
    """Text with tags dropped, entities decoded and every run of white space one space."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()


def level_for(card: dict[str, Any], p: float) -> str:
    """The card's risk level for P(malignant) ``p``, by the card's own policy (``RiskPolicy.level_for``)."""
    return str(RiskPolicy.model_validate(card["risk_policy"]).level_for(p).level.value)


def problems_of(result: dict[str, Any], card: dict[str, Any]) -> list[str]:
    """What in one result (an image's or a case's) contradicts itself, in words ([] when nothing)."""
    out = []
    probs: dict[str, float] = result["probabilities"]
    best = max(probs.values())
    if probs[result["top_class"]] < best:
        top = max(probs, key=lambda k: probs[k])
        out.append(f"named {result['top_class']} ({probs[result['top_class']]:.3f}) but {top} has {best:.3f}")
    domain = result.get("domain") or {}
    if domain.get("in_domain", True):
        expected = level_for(card, float(result["p_malignant"]))
        if result["risk_level"] != expected:
            out.append(
                f"risk {result['risk_level']} but the card's level for P {result['p_malignant']:.3f} is {expected}"
            )
    elif result["risk_level"] != "indeterminate":
        out.append(f"out of domain but risk {result['risk_level']}")
    return out


def pdf_text(pdf: bytes) -> str:
    """The PDF's text (``pdftotext``), or "" when poppler is not installed."""
    if shutil.which("pdftotext") is None:
        return ""
    done = subprocess.run(["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True)
    return done.stdout.decode("utf-8", "replace")


def web_login(client: TestClient, email: str) -> TestClient:
    browser = TestClient(client.app)
    browser.get("/login")
    token = browser.cookies["oncolens_csrf"]
    browser.post("/login", data={"email": email, "password": PASSWORD, "csrf_token": token}, follow_redirects=False)
    return browser


def edge_problems(
    client: TestClient, browser: TestClient, headers: dict[str, str], model: str, image: Path
) -> list[str]:
    """Store one case and compare the web page, the PDF and the FHIR conclusion with the API's statement."""
    with image.open("rb") as handle:
        response = client.post(
            "/api/v1/cases",
            data={"model_id": model, "patient_ref": "CHECK"},
            files={"files": (image.name, handle.read())},
            headers=headers,
        )
    if response.status_code != 201:
        return [f"case not stored: {response.status_code} {response.text[:200]}"]
    case = response.json()
    statement = case["result"].get("statement")
    if not statement:
        return ["the API gives no 'statement' field: the edges cannot be compared with it"]
    want = normalised(statement)
    found = {
        "web page": normalised(browser.get(f"/cases/{case['id']}").text),
        "PDF": normalised(pdf_text(client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=headers).content)),
        "FHIR conclusion": normalised(
            next(
                (
                    e["resource"].get("conclusion", "")
                    for e in client.get(f"/api/v1/cases/{case['id']}/fhir", headers=headers).json()["entry"]
                    if e["resource"]["resourceType"] == "DiagnosticReport"
                ),
                "",
            )
        ),
    }
    return [f"{edge} does not carry the statement {statement!r}" for edge, text in found.items() if want not in text]


def check_dataset(
    client: TestClient, browser: TestClient, headers: dict[str, str], folder: Path, model: str, split: str, cases: int
) -> dict[str, Any]:
    card = client.get(f"/api/v1/models/{model}").json()
    samples = select_split(read_manifest(folder), split)
    samples, _ = drop_labels(samples, list(card.get("dataset", {}).get("excluded_labels", [])))
    counts: Counter[str] = Counter()
    examples: list[str] = []
    for index, sample in enumerate(samples):
        with sample.file.open("rb") as handle:
            response = client.post(f"/api/v1/models/{model}/predict", files={"file": (sample.file.name, handle.read())})
        if response.status_code != 200:
            counts["refused"] += 1  # e.g. a wrong-modality refusal (415): no answer, so nothing to contradict
            continue
        counts["answered"] += 1
        body = response.json()
        image = body["images"][0]
        found = problems_of(image, card)
        # The case-level result of one image must say what the image's result says.
        found += [
            f"the case says {key} {body[key]!r}, its image {image[key]!r}"
            for key in ("top_class", "risk_level", "statement")
            if key in image and body.get(key) != image[key]
        ]
        if found:
            counts["contradictions"] += 1
            for text in found:
                counts[
                    CLASS_KEY if text.startswith("named") else LEVEL_KEY if text.startswith("risk") else CASE_KEY
                ] += 1
            if len(examples) < 5:
                examples.append(f"{sample.file.name}: {'; '.join(found)}")
        if index < cases:
            edges = edge_problems(client, browser, headers, model, sample.file)
            counts["edge cases"] += 1
            if edges:
                counts["edge contradictions"] += 1
                if len(examples) < 10:
                    examples.append(f"{sample.file.name} (case): {'; '.join(edges)}")
    return {"model": model, "split": split, "images": len(samples), **counts, "examples": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="dataset folders (manifest.csv + images/)")
    parser.add_argument("--model", help="model id (default: each folder's name)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cases", type=int, default=10, help="images per dataset also stored as a case and read back")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), secret_key="contradiction-check-key-long-enough-for-hs256", preload_models=False
        )
        with TestClient(create_app(settings)) as client:
            with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
                session.add(
                    User(email="check@oncolens.local", hashed_password=hash_password(PASSWORD), role="clinician")
                )
                session.commit()
            token = client.post("/api/v1/auth/token", data={"username": "check@oncolens.local", "password": PASSWORD})
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            browser = web_login(client, "check@oncolens.local")
            for folder in args.datasets:
                model = args.model or folder.resolve().name
                row = check_dataset(client, browser, headers, folder, model, args.split, args.cases)
                rows.append(row)
                by_class, by_level, by_case = row.get(CLASS_KEY, 0), row.get(LEVEL_KEY, 0), row.get(CASE_KEY, 0)
                print(
                    f"{model:<16} {row['images']:>5} images  {row.get('contradictions', 0):>4} contradictions "
                    f"(class {by_class}, level {by_level}, case/image {by_case})"
                    f"  edges: {row.get('edge contradictions', 0)} of {row.get('edge cases', 0)} cases  "
                    f"refused {row.get('refused', 0)}",
                    flush=True,
                )
                for example in row["examples"]:
                    print(f"    {example}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    total = sum(r.get("contradictions", 0) + r.get("edge contradictions", 0) for r in rows)
    print(f"total contradictions: {total}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
