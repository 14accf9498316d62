"""The learning loop end to end on a tiny generated model, on SQLite and PostgreSQL: reviews with a
reference standard -> export-dataset -> adapt (gate passes; gate fails; too few images) -> install ->
shadow -> promote -> rollback -> monitoring with and without drift.

The model ("blob") is hand-made: its logit for "blob" is 4 x the mean red of the image and for "plain"
minus that. Its card is given a temperature and class offsets that make it under-confident on the
generated "site" images (P(blob) about 0.3 for plain and 0.7 for blob images, which are never
confused): miscalibrated, as a shipped model is on a clinic's camera, and something `adapt` can fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from sqlmodel import Session, select

from oncolens.app import create_app
from oncolens.decision import p_malignant, probabilities
from oncolens.errors import InvalidInput, PermissionDenied
from oncolens.evaluation.drift import reference_distribution
from oncolens.services.audit import Actor
from oncolens.services.learning import GateFailed, NotEnoughImages, adapt, export_dataset, site_version
from oncolens.store.db.models import AuditEvent, Case, User, utcnow
from oncolens.store.stats import rebuild
from oncolens.zoo import Zoo
from oncolens.zoo.preprocess import preprocess
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login

MODEL = "blob"
KEY = "test-secret-key-that-is-long-enough-for-hs256"


def image(red: float, seed: int, size: int = 64) -> Image.Image:
    """A generated image whose mean red is about ``red`` (0..1), with noise and a textured background."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(20, 90, (size, size, 3)).astype(np.float64)
    pixels[..., 0] = np.clip(rng.normal(red * 255, 25, (size, size)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def site_red(label: str, seed: int, cast: float = 0.0) -> float:
    """A site image's mean red: blob images 0.40-0.55, plain ones 0.10-0.20 (plus a camera's cast)."""
    rng = np.random.default_rng(10_000 + seed)
    return float(rng.uniform(0.40, 0.55) if label == "blob" else rng.uniform(0.10, 0.20)) + cast


@dataclass
class Site:
    client: TestClient
    zoo_root: Path
    admin: dict[str, str]
    doctor: dict[str, str]
    cases: list[dict[str, Any]]


def make_zoo(blob_package: Path, root: Path) -> Path:
    """The blob package with under-confident class offsets and a test distribution for drift."""
    folder = root / MODEL
    shutil.copytree(blob_package, folder)
    card = json.loads((folder / "card.json").read_text())
    card["calibration"] = {"method": "test offsets", "temperature": 1.5, "logit_bias": [-1.25, 1.25]}
    card["risk_policy"]["malignant_threshold"] = 0.5
    zoo = Zoo([root])
    package = zoo.get(MODEL)
    labels = ["blob" if i % 3 == 0 else "plain" for i in range(300)]
    pictures = [image(site_red(label, 50_000 + i), 50_000 + i) for i, label in enumerate(labels)]
    logits, _ = package.run(preprocess(pictures, package.input_spec))
    from oncolens.zoo.card import parse_card

    p = p_malignant(probabilities(parse_card(card), logits), package.malignant)
    card["monitoring"] = reference_distribution(p, "test", "generated in the test")
    card["metrics"] = {"malignant": {"sensitivity": 1.0, "specificity": 1.0, "auc": 1.0}}
    (folder / "card.json").write_text(json.dumps(card))
    return root


def post_case(client: TestClient, headers: dict[str, str], picture: Image.Image, ref: str) -> dict[str, Any]:
    made = client.post(
        "/api/v1/cases",
        data={"model_id": MODEL, "patient_ref": ref},
        files=[("files", ("site.png", png(picture), "image/png"))],
        headers=headers,
    )
    assert made.status_code == 201, made.text
    return dict(made.json())


@pytest.fixture(scope="module")
def site(blob_package: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    zoo_root = make_zoo(blob_package, tmp_path_factory.mktemp("site-zoo"))
    settings = db_settings(
        tmp_path_factory.mktemp("site-data"), database_url, model_poll_s=0.2, drift_min_cases=40, compat_enabled=False
    )
    with TestClient(create_app(settings, Zoo([zoo_root]))) as client:
        add_user(client, "admin@clinic.org", "admin")
        add_user(client, "doc@clinic.org", "clinician")
        doctor = login(client, "doc@clinic.org")
        cases = []
        for i in range(150):  # one image per patient; every third a blob
            label = "blob" if i % 3 == 0 else "plain"
            case = post_case(client, doctor, image(site_red(label, i), i), f"P-{i:03d}")
            cases.append(case | {"label": label})
        yield Site(client, zoo_root, login(client, "admin@clinic.org"), doctor, cases)


def admin_actor(client: TestClient) -> Actor:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        user = session.exec(select(User).where(User.email == "admin@clinic.org")).one()
        session.expunge(user)
    return Actor(user, channel="test")


def test_review_records_and_checks_the_reference_standard(site: Site) -> None:
    client, doctor = site.client, site.doctor
    first = site.cases[0]
    url = f"/api/v1/cases/{first['id']}"
    wrong = client.patch(
        url, json={"reference_class": "melanoma", "reference_standard": "histopathology"}, headers=doctor
    )
    assert wrong.status_code == 422
    assert "'melanoma' is not a class of blob; one of blob, plain" in wrong.json()["detail"]
    bare = client.patch(url, json={"reference_class": "blob"}, headers=doctor)
    assert bare.status_code == 422 and "reference_standard: needed with a reference_class" in bare.json()["detail"]
    unknown = client.patch(url, json={"reference_class": "blob", "reference_standard": "guess"}, headers=doctor)
    assert unknown.status_code == 422
    future = (utcnow() + timedelta(days=3)).date().isoformat()
    later = client.patch(
        url,
        json={"reference_class": "blob", "reference_standard": "histopathology", "reference_date": future},
        headers=doctor,
    )
    assert later.status_code == 422 and "is in the future" in later.json()["detail"]
    for case in site.cases:
        body = {"status": "confirmed", "reference_class": case["label"], "reference_standard": "histopathology"}
        reviewed = client.patch(f"/api/v1/cases/{case['id']}", json=body, headers=doctor)
        assert reviewed.status_code == 200, reviewed.text
    shown = reviewed.json()
    today = utcnow().date().isoformat()
    assert shown["status"] == "confirmed" and shown["reference_class"] == site.cases[-1]["label"]
    assert shown["reference_standard"] == "histopathology" and shown["reference_date"] == today
    assert shown["review"]["reference_class"] == shown["reference_class"]
    fhir = client.get(f"/api/v1/cases/{first['id']}/fhir", headers=doctor).json()
    observations = [e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "Observation"]
    reference = next(o for o in observations if o["code"]["text"] == "Reference diagnosis")
    assert reference["valueCodeableConcept"]["coding"][0]["code"] == "blob"
    assert reference["method"]["coding"][0]["code"] == "histopathology" and reference["effectiveDateTime"] == today
    assert (
        f"Reference diagnosis: Red blob (blob; histopathology, {today})." in fhir["entry"][0]["resource"]["conclusion"]
    )
    pdf = client.get(f"/api/v1/cases/{first['id']}/report.pdf", headers=doctor)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")


def test_export_is_a_dataset_training_reads_and_byte_identical_twice(site: Site, tmp_path: Path) -> None:
    from oncolens.evaluation.datasets import read_manifest

    client = site.client
    state = client.app.state  # type: ignore[attr-defined]
    # One more case, left unreviewed: counted, not exported.
    post_case(client, site.doctor, image(0.15, 999), "P-unreviewed")
    with Session(state.engine) as session:
        clinician = session.exec(select(User).where(User.email == "doc@clinic.org")).one()
        with pytest.raises(PermissionDenied, match="admin role"):
            export_dataset(session, state.store, Actor(clinician), MODEL, tmp_path / "no", KEY)
        first = export_dataset(session, state.store, admin_actor(client), MODEL, tmp_path / "a", KEY)
        second = export_dataset(session, state.store, admin_actor(client), MODEL, tmp_path / "b", KEY)
        with pytest.raises(InvalidInput, match="not an empty folder"):
            export_dataset(session, state.store, admin_actor(client), MODEL, tmp_path / "a", KEY)
        events = session.exec(select(AuditEvent).where(AuditEvent.action == "export_dataset")).all()
    assert first.manifest_sha256 == second.manifest_sha256
    for name in ("manifest.csv", "dataset.json", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert hashlib.sha256((tmp_path / "a" / "manifest.csv").read_bytes()).hexdigest() == first.manifest_sha256
    assert first.rows == 150 and first.cases == 150 and first.left_out["unreviewed cases"] == 1
    assert len(events) == 2 and all(e.actor == "admin@clinic.org" for e in events)
    samples = read_manifest(tmp_path / "a")
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert sum(s.split == "train" for s in samples) > sum(s.split == "test" for s in samples)
    assert all(s.file.is_file() for s in samples)
    text = (tmp_path / "a" / "manifest.csv").read_text()
    assert "P-0" not in text  # no patient reference leaves
    assert sorted(s.label for s in samples) == sorted(c["label"] for c in site.cases)
    assert len({s.group_id for s in samples}) == 150  # one case per patient here
    summary = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert summary["model_versions"] == {"0.0.1": 150} and summary["rows"] == 150


def exported(site: Site, folder: Path) -> Path:
    state = site.client.app.state  # type: ignore[attr-defined]
    if not (folder / "manifest.csv").is_file():
        with Session(state.engine) as session:
            export_dataset(session, state.store, admin_actor(site.client), MODEL, folder, KEY)
    return folder


def test_adapt_restores_calibration_and_passes_its_gate(site: Site, tmp_path_factory: pytest.TempPathFactory) -> None:
    dataset = exported(site, tmp_path_factory.mktemp("export") / "data")
    parent = Zoo([site.zoo_root]).get(MODEL)
    out = site.zoo_root.parent / f"{site.zoo_root.name}-site-version"
    result = adapt(parent, dataset, out, site_version(parent.version, []), "pytest", n_boot=200)
    card = result.card
    assert card.version == "0.0.1+site.1" and card.gate_passed is True
    calibration = next(c for c in result.gate["criteria"] if c["criterion"] == "calibration")
    assert calibration["parent"]["consistency_p"] < 0.05  # the parent fails on the site's images
    assert calibration["site"]["consistency_p"] >= 0.05 and calibration["site"]["ece"] < calibration["parent"]["ece"]
    auroc = next(c for c in result.gate["criteria"] if c["criterion"] == "macro AUROC")
    assert abs(auroc["site"] - auroc["parent"]) <= 0.01
    assert card.calibration.temperature < 1.0  # sharper: the parent was under-confident
    lineage = card.lineage or {}
    assert lineage["parent"] == {
        "id": MODEL,
        "version": "0.0.1",
        "sha256": parent.card.sha256,
        "card_sha256": hashlib.sha256((site.zoo_root / MODEL / "card.json").read_bytes()).hexdigest(),
    }
    manifest = (dataset / "manifest.csv").read_bytes()
    assert lineage["dataset"]["sha256"] == hashlib.sha256(manifest).hexdigest()
    assert sum(lineage["dataset"]["counts"]["test"].values()) == int(lineage["gate"]["rows"])
    assert card.sha256 == parent.card.sha256  # the same network; only the card changed
    assert (out / "model.onnx").read_bytes() == (site.zoo_root / MODEL / "model.onnx").read_bytes()
    assert site_version("0.0.1", ["0.0.1+site.1", "0.0.1+site.3", "0.0.2+site.9"]) == "0.0.1+site.4"


def test_adapt_can_retrain_the_head_on_cached_features(site: Site, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from oncolens.zoo import ModelPackage

    dataset = overlapping_dataset(tmp_path / "data")
    parent = Zoo([site.zoo_root]).get(MODEL)
    out = tmp_path / "tail"
    result = adapt(parent, dataset, out, "0.0.1+site.5", "pytest", n_boot=100, retrain_tail=True)
    card = result.card
    assert card.gate_passed is True and card.int8 is None
    assert card.sha256 != parent.card.sha256 and card.head != parent.card.head
    assert "head (linear layer on the pooled features) re-trained on" in (card.lineage or {})["refit"]["head"]
    served = ModelPackage.load(out)  # the sha256 and shapes check out; the CAM head is the graph's
    pictures = [image(0.55, 5), image(0.10, 6)]
    logits, features = served.run(preprocess(pictures, served.input_spec), with_features=True)
    assert features is not None
    from oncolens.services.learning import card_head

    weight, bias = card_head(card)  # the card's head (heat-maps) is the one in the graph
    assert np.abs(features.mean(axis=(2, 3)) @ weight.T + bias - logits).max() < 1e-3
    assert probabilities(card, logits)[0, 0] > 0.9 and probabilities(card, logits)[1, 0] < 0.1
    train = [row for row in csv.DictReader((dataset / "manifest.csv").open()) if row["split"] == "train"]
    few = tmp_path / "few"
    shutil.copytree(dataset, few)
    with (few / "manifest.csv").open("w", newline="") as handle:  # too few blobs left in train
        rows = list(csv.DictReader((dataset / "manifest.csv").open()))
        blobs = [r for r in rows if r["split"] == "train" and r["label"] == "blob"][:5]
        kept = [r for r in rows if r["split"] != "train" or r["label"] != "blob" or r in blobs]
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    assert len(train) > len([r for r in kept if r["split"] == "train"])
    with pytest.raises(NotEnoughImages, match="at least 20 train images of two classes or more"):
        adapt(parent, few, tmp_path / "few-out", "0.0.1+site.6", retrain_tail=True)


def overlapping_dataset(root: Path) -> Path:
    """900 rows, 60/20/20, whose classes overlap in red (blob 0.25-0.55, plain 0.10-0.38): not separable."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(7)
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "group_id", "split"])
        writer.writeheader()
        for i in range(900):
            label = "blob" if i % 3 == 0 else "plain"
            red = rng.uniform(0.25, 0.55) if label == "blob" else rng.uniform(0.10, 0.38)
            name = f"images/{i}.png"
            image(red, 80_000 + i).save(root / name)
            split = ("train", "train", "train", "val", "test")[i % 5] if i % 5 < 3 else ("val", "test")[i % 5 - 3]
            writer.writerow({"file": name, "label": label, "group_id": f"o{i}", "split": split})
    return root


def contradicting_dataset(root: Path) -> Path:
    """120 rows whose test images show the other class than their label (train and val are right)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(120):
        label = "blob" if i % 2 else "plain"
        split = "test" if i >= 80 else ("val" if i >= 60 else "train")
        shown = label if split != "test" else ("plain" if label == "blob" else "blob")
        name = f"images/{i}.png"
        image(site_red(shown, 70_000 + i), 70_000 + i).save(root / name)
        rows.append({"file": name, "label": label, "group_id": f"g{i}", "split": split})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "group_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_a_failed_gate_writes_nothing_and_names_the_criterion(site: Site, tmp_path: Path) -> None:
    """Test rows unlike the fitted ones (labels that contradict the images) fail the calibration criterion."""
    root = contradicting_dataset(tmp_path / "contradicting")
    parent = Zoo([site.zoo_root]).get(MODEL)
    out = tmp_path / "never"
    with pytest.raises(GateFailed) as failed:
        adapt(parent, root, out, "0.0.1+site.7", n_boot=100)
    assert "calibration" in [c["criterion"] for c in failed.value.failed]
    assert not out.exists()
    few = tmp_path / "few"
    (few / "images").mkdir(parents=True)
    with (few / "manifest.csv").open("w", newline="") as handle:
        handle.write("file,label,split\n")
        for i in range(6):
            image(0.5, i).save(few / f"images/{i}.png")
            handle.write(f"images/{i}.png,{'blob' if i % 2 else 'plain'},{'test' if i > 3 else 'train'}\n")
    with pytest.raises(NotEnoughImages, match="at least 20 are needed"):
        adapt(parent, few, tmp_path / "few-out", "0.0.1+site.8")


def wait_for(check: Any, seconds: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def predicted_version(client: TestClient) -> str:
    answer = client.post(
        f"/api/v1/models/{MODEL}/predict", files=[("file", ("x.png", png(image(0.3, 1)), "image/png"))]
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["model_version"])


def visible(case: dict[str, Any]) -> dict[str, Any]:
    """What a clinician sees of a case, without its id, times and image ids."""
    shown = {k: v for k, v in case.items() if k not in ("id", "created_at", "updated_at", "images")}
    shown["images"] = [{k: v for k, v in i.items() if k not in ("id", "url")} for i in case["images"]]
    return shown


def test_install_shadow_promote_and_roll_back(site: Site, tmp_path_factory: pytest.TempPathFactory) -> None:
    client, admin, doctor = site.client, site.admin, site.doctor
    package = site.zoo_root.parent / f"{site.zoo_root.name}-site-version"
    assert package.is_dir(), "made by the adapt test"
    archive = io.BytesIO()
    with __import__("zipfile").ZipFile(archive, "w") as zipped:
        for path in sorted(package.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(package).as_posix())
    upload = {"file": ("p.zip", archive.getvalue(), "application/zip")}
    refused = client.post(f"/api/v1/models/{MODEL}/versions", files=upload, headers=doctor)
    assert refused.status_code == 403
    installed = client.post(f"/api/v1/models/{MODEL}/versions", files=upload, headers=admin)
    assert installed.status_code == 201, installed.text
    listing = installed.json()
    assert listing["serving"] == "0.0.1" and [v["version"] for v in listing["versions"]] == ["0.0.1", "0.0.1+site.1"]
    assert listing["versions"][1]["gate_passed"] is True
    bad_zip = client.post(
        f"/api/v1/models/{MODEL}/versions", files={"file": ("p.zip", b"not a zip", "application/zip")}, headers=admin
    )
    assert bad_zip.status_code == 422 and "not a zip archive" in bad_zip.json()["detail"]
    sneaky = io.BytesIO()
    with __import__("zipfile").ZipFile(sneaky, "w") as zipped:
        zipped.writestr("../../escape.txt", "x")
    escape = client.post(
        f"/api/v1/models/{MODEL}/versions", files={"file": ("p.zip", sneaky.getvalue())}, headers=admin
    )
    assert escape.status_code == 422 and "points outside the package" in escape.json()["detail"]
    other = client.post("/api/v1/models/skin-ham10000/versions", files=upload, headers=admin)
    assert other.status_code == 422 and "a version of 'blob', not of skin-ham10000" in other.json()["detail"]
    # A site version whose gate failed installs but is never promoted.
    failed = tmp_path_factory.mktemp("failed") / "pkg"
    shutil.copytree(package, failed)
    card = json.loads((failed / "card.json").read_text())
    card["version"] = "0.0.1+site.2"
    card["lineage"]["gate"]["passed"] = False
    (failed / "card.json").write_text(json.dumps(card))
    state = client.app.state  # type: ignore[attr-defined]
    from oncolens.services.versions import VersionService

    with Session(state.engine) as session:
        VersionService(session, state.zoo).install(admin_actor(client), failed)
    no = client.post(f"/api/v1/models/{MODEL}/versions/0.0.1+site.2/promote", json={"why": "try"}, headers=admin)
    assert no.status_code == 422 and "failed its acceptance gate" in no.json()["detail"]
    assert client.post(f"/api/v1/models/{MODEL}/rollback", json={"why": "x"}, headers=admin).status_code == 422
    no_why = client.post(f"/api/v1/models/{MODEL}/versions/0.0.1+site.1/shadow", json={"why": ""}, headers=admin)
    assert no_why.status_code == 422

    # Shadow: the same images give the clinician the same case, with and without a shadow.
    before = post_case(client, doctor, image(0.47, 4242), "P-shadow")
    shadowed = client.post(
        f"/api/v1/models/{MODEL}/versions/0.0.1+site.1/shadow", json={"why": "watch it on our cases"}, headers=admin
    )
    assert shadowed.status_code == 200 and shadowed.json()["shadow"] == "0.0.1+site.1"
    wait_for(lambda: state.zoo.shadow_of(MODEL) is not None)
    after = post_case(client, doctor, image(0.47, 4242), "P-shadow")
    assert visible(after) == visible(before)
    pdfs = [client.get(f"/api/v1/cases/{c['id']}/report.pdf", headers=doctor).content for c in (before, after)]
    assert pdf_text(pdfs[0]).replace(before["id"], "") == pdf_text(pdfs[1]).replace(after["id"], "")
    with Session(state.engine) as session:
        stored = session.get(Case, after["id"])
        assert stored is not None and stored.shadow_version == "0.0.1+site.1"
        shadow = json.loads(stored.shadow_result_json or "{}")
    assert (
        shadow["top_class"] == after["result"]["top_class"] and shadow["p_malignant"] != after["result"]["p_malignant"]
    )
    agreement = client.get(f"/api/v1/models/{MODEL}/versions", headers=admin).json()["versions"][1]["agreement"]
    assert agreement == {"cases": 1, "same_class": 1, "same_level": agreement["same_level"]}

    # Promote: every new answer comes from the site version within 5 s, without a restart.
    promoted = client.post(
        f"/api/v1/models/{MODEL}/versions/0.0.1+site.1/promote", json={"why": "gate passed"}, headers=admin
    )
    assert promoted.status_code == 200 and promoted.json()["serving"] == "0.0.1+site.1"
    assert promoted.json()["shadow"] is None  # the promoted shadow no longer runs beside itself
    assert wait_for(lambda: predicted_version(client) == "0.0.1+site.1") < 5.0
    made = post_case(client, doctor, image(0.47, 4242), "P-after")
    assert made["model_version"] == "0.0.1+site.1"
    assert made["result"]["p_malignant"] > before["result"]["p_malignant"]  # sharper, as adapted
    # Roll back one step: the shipped version again; each case keeps the version that answered it.
    back = client.post(f"/api/v1/models/{MODEL}/rollback", json={"why": "compare"}, headers=admin)
    assert back.status_code == 200 and back.json()["serving"] == "0.0.1"
    assert wait_for(lambda: predicted_version(client) == "0.0.1") < 5.0
    assert client.get(f"/api/v1/cases/{made['id']}", headers=doctor).json()["model_version"] == "0.0.1+site.1"
    history = client.get(f"/api/v1/models/{MODEL}/versions", headers=admin).json()["history"]
    assert [(h["action"], h["live_version"], h["by"]) for h in history] == [
        ("shadow", "0.0.1", "admin@clinic.org"),
        ("promote", "0.0.1+site.1", "admin@clinic.org"),
        ("rollback", "0.0.1", "admin@clinic.org"),
    ]
    with Session(state.engine) as session:
        actions = session.exec(select(AuditEvent.action).where(AuditEvent.action.startswith("model_"))).all()  # type: ignore[attr-defined]
    assert sorted(actions) == ["model_install", "model_install", "model_promote", "model_rollback", "model_shadow"]


def pdf_text(pdf: bytes) -> str:
    import subprocess

    text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    return re.sub(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2})?", "TIME", text)  # two cases' times differ


def test_monitoring_raises_drift_for_a_colour_cast_and_not_for_the_same_camera(site: Site) -> None:
    client, admin, doctor = site.client, site.admin, site.doctor
    state = client.app.state  # type: ignore[attr-defined]
    cast = [
        post_case(client, doctor, image(site_red("plain" if i % 3 else "blob", 90_000 + i, 0.25), i), f"C-{i}")
        for i in range(60)
    ]
    with Session(state.engine) as session:  # the cast batch came a month earlier
        session.execute(
            update(Case)
            .where(Case.id.in_([c["id"] for c in cast]))  # type: ignore[attr-defined]
            .values(created_at=utcnow() - timedelta(days=45))
        )
        session.commit()
        rebuild(session)  # rows changed by SQL: the kept counts are rebuilt, as `oncolens db refresh-stats` does
    report = client.get(f"/api/v1/models/{MODEL}/monitoring", params={"period": "month"}, headers=admin)
    assert report.status_code == 200, report.text
    periods = report.json()["periods"]
    assert len(periods) == 2
    earlier, now = periods
    assert earlier["cases"] == 60 and earlier["drift"]["flag"] is True and earlier["drift"]["psi"] > 0.25
    assert now["cases"] >= 150 and now["drift"]["flag"] is False and now["drift"]["ks_p"] > 0.01
    assert now["reviewed_cases"] == 150 and now["sensitivity"] == 1.0 and now["auroc"] == 1.0
    assert set(now["drift"]) >= {"flag", "psi", "ks_p"} and "drift" in report.json()["overall"]
    assert client.get(f"/api/v1/models/{MODEL}/monitoring", headers=doctor).status_code == 403
    bad = client.get(f"/api/v1/models/{MODEL}/monitoring", params={"period": "year"}, headers=admin)
    assert bad.status_code == 422
    backwards = client.get(
        f"/api/v1/models/{MODEL}/monitoring", params={"start": "2026-02-01", "end": "2026-01-01"}, headers=admin
    )
    assert backwards.status_code == 422 and "is after end" in backwards.json()["detail"]
    edge = client.get(
        f"/api/v1/models/{MODEL}/monitoring", params={"start": "0001-01-01", "end": "9999-12-31"}, headers=admin
    )
    assert edge.status_code == 200 and edge.json()["overall"]["cases"] == report.json()["overall"]["cases"]
    metrics = client.get("/metrics").text
    assert f'oncolens_model_reviewed_cases{{model="{MODEL}"}}' in metrics
