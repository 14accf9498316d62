"""A simulated clinic for the learning loop (issue 42's floors), through the running app's API.

The "site camera": held-out images of a shipped dataset (its ``test`` split) with a fixed colour cast
and brightness change. Site A sees every test image through that camera, site B (a separate server
and database) sees the same images unaltered. Each image is one case made with
``POST /api/v1/cases`` (patient reference: the lesion id) and reviewed with its label as the reference
class (the dataset's own ground truth: histopathology, follow-up or consensus). Then, on site A:
export the dataset twice (same sha256?), adapt the package (gate figures before and after), install
it, post images with the shadow off and on (does a clinician see the same?), and read the monitoring
of both sites (drift flag for the cast batch, none for the unaltered one).

    python scripts/simulate_site.py [--model skin-ham10000] [--datasets ../shared/datasets] \
        [--limit N] [--out benchmarks/results/simulated-site.json]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlmodel import Session, select

from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.evaluation.datasets import Sample, read_manifest, select_split
from oncolens.services.audit import Actor
from oncolens.services.learning import GateFailed, adapt, export_dataset, site_version
from oncolens.store.db.models import Role, User
from oncolens.zoo import BUILTIN_DIR, Zoo

PASSWORD = "simulated-site-password-1"
STANDARDS = {
    "histo": "histopathology",
    "follow_up": "clinical_follow_up",
    "consensus": "expert_consensus",
    "confocal": "expert_consensus",
}
CAST = (1.12, 1.0, 0.85)  # red up, blue down: a warm white balance
BRIGHTNESS = 1.15


def camera(data: bytes) -> bytes:
    """The site camera: a fixed colour cast and a brightness change, saved as JPEG (quality 92)."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    pixels = np.clip(pixels * np.asarray(CAST) * BRIGHTNESS, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=92)
    return out.getvalue()


def server(data_dir: Path, model_id: str) -> tuple[TestClient, dict[str, str]]:
    from oncolens.accounts.auth import hash_password

    settings = Settings(data_dir=data_dir, preload_models=False, compat_enabled=False, model_poll_s=0.5)
    client = TestClient(create_app(settings, Zoo([BUILTIN_DIR])))
    client.__enter__()
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        for email, role in (("admin@site.org", Role.admin), ("doc@site.org", Role.clinician)):
            session.add(User(email=email, hashed_password=hash_password(PASSWORD), role=role.value))
        session.commit()
    token = client.post("/api/v1/auth/token", data={"username": "doc@site.org", "password": PASSWORD}).json()
    return client, {"Authorization": f"Bearer {token['access_token']}"}


def admin_headers(client: TestClient) -> dict[str, str]:
    token = client.post("/api/v1/auth/token", data={"username": "admin@site.org", "password": PASSWORD}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


def post(client: TestClient, headers: dict[str, str], model_id: str, data: bytes, ref: str) -> dict[str, Any]:
    made = client.post(
        "/api/v1/cases",
        data={"model_id": model_id, "patient_ref": ref},
        files=[("files", ("image.jpg", data, "image/jpeg"))],
        headers=headers,
    )
    made.raise_for_status()
    return dict(made.json())


def make_cases(client: TestClient, headers: dict[str, str], model_id: str, samples: list[Sample], cast: bool) -> int:
    for sample in samples:
        data = sample.file.read_bytes()
        case = post(client, headers, model_id, camera(data) if cast else data, sample.group_id)
        review = {
            "status": "confirmed",
            "reference_class": sample.label,
            "reference_standard": STANDARDS.get(sample.metadata.get("dx_type", ""), "expert_consensus"),
        }
        client.patch(f"/api/v1/cases/{case['id']}", json=review, headers=headers).raise_for_status()
    return len(samples)


def visible(case: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in case.items() if k not in ("id", "created_at", "updated_at", "images")}
    shown["images"] = [{k: v for k, v in i.items() if k not in ("id", "url")} for i in case["images"]]
    return shown


def pdf_text(client: TestClient, headers: dict[str, str], case: dict[str, Any]) -> str:
    pdf = client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=headers).content
    text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    # The case's id and times differ between two cases of the same image; nothing else may.
    return re.sub(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2})?", "TIME", text.replace(case["id"], ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="skin-ham10000")
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--limit", type=int, default=0, help="at most this many images per site (0: all)")
    parser.add_argument("--shadow-checks", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/simulated-site.json"))
    args = parser.parse_args()
    test = select_split(read_manifest(args.datasets / args.model), "test")
    sites = {"A": test, "B": test}
    if args.limit:
        sites = {name: rows[: args.limit] for name, rows in sites.items()}
    work = Path(tempfile.mkdtemp(prefix="oncolens-site-"))
    result: dict[str, Any] = {"model": args.model, "camera": {"cast_rgb": CAST, "brightness": BRIGHTNESS}}
    start = time.perf_counter()
    client_a, doc_a = server(work / "site-a", args.model)
    client_b, doc_b = server(work / "site-b", args.model)
    result["cases"] = {
        "A (cast)": make_cases(client_a, doc_a, args.model, sites["A"], cast=True),
        "B (unaltered)": make_cases(client_b, doc_b, args.model, sites["B"], cast=False),
    }
    result["seconds_to_make_cases"] = round(time.perf_counter() - start, 1)
    state = client_a.app.state  # type: ignore[attr-defined]
    with Session(state.engine) as session:
        admin = session.exec(select(User).where(User.email == "admin@site.org")).one()
        actor = Actor(admin, channel="simulation")
        key = state.secret
        exports = [export_dataset(session, state.store, actor, args.model, work / f"export-{i}", key) for i in (1, 2)]
    result["export"] = {
        "sha256": [e.manifest_sha256 for e in exports],
        "identical": exports[0].manifest_sha256 == exports[1].manifest_sha256,
        "rows": exports[0].rows,
        "counts": exports[0].counts,
        "left_out": exports[0].left_out,
    }
    parent = state.zoo.get(args.model)
    package = work / "site-package"
    chosen = site_version(parent.version, [])
    try:
        adapted = adapt(parent, work / "export-1", package, chosen, "scripts/simulate_site.py")
        result["gate"] = adapted.gate
    except GateFailed as exc:
        result["gate"] = exc.gate
        print(json.dumps(result, indent=2))
        raise SystemExit("the gate failed: " + str(exc)) from None
    try:  # the same data with the head re-trained as well (--retrain-tail), for comparison
        tail = adapt(parent, work / "export-1", work / "site-tail", chosen, "--retrain-tail", retrain_tail=True)
        result["gate_retrain_tail"] = tail.gate | {"head": (tail.card.lineage or {})["refit"]["head"]}
    except GateFailed as exc:
        result["gate_retrain_tail"] = exc.gate
    admin_a = admin_headers(client_a)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(package.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(package).as_posix())
    installed = client_a.post(
        f"/api/v1/models/{args.model}/versions", files={"file": ("p.zip", archive.getvalue())}, headers=admin_a
    )
    installed.raise_for_status()
    version = adapted.card.version
    # What a clinician sees with the shadow off, then on, for the same images.
    checks = sites["A"][: args.shadow_checks]
    off = [post(client_a, doc_a, args.model, camera(s.file.read_bytes()), s.group_id) for s in checks]
    client_a.post(
        f"/api/v1/models/{args.model}/versions/{version}/shadow", json={"why": "simulation"}, headers=admin_a
    ).raise_for_status()
    deadline = time.monotonic() + 5
    while state.zoo.shadow_of(args.model) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    on = [post(client_a, doc_a, args.model, camera(s.file.read_bytes()), s.group_id) for s in checks]
    same_json = sum(visible(a) == visible(b) for a, b in zip(off, on, strict=True))
    same_pdf = sum(pdf_text(client_a, doc_a, a) == pdf_text(client_a, doc_a, b) for a, b in zip(off, on, strict=True))
    result["shadow"] = {"cases": len(checks), "identical_json": same_json, "identical_pdf_text": same_pdf}
    result["shadow"]["agreement"] = client_a.get(f"/api/v1/models/{args.model}/versions", headers=admin_a).json()[
        "versions"
    ][-1]["agreement"]
    for name, client in (("A (cast)", client_a), ("B (unaltered)", client_b)):
        report = client.get(f"/api/v1/models/{args.model}/monitoring", headers=admin_headers(client)).json()
        overall = report["overall"]
        result.setdefault("monitoring", {})[name] = {
            "cases": overall["cases"],
            "drift": overall["drift"],
            "sensitivity": overall["sensitivity"],
            "specificity": overall["specificity"],
            "auroc": overall["auroc"],
            "out_of_domain_rate": overall["out_of_domain_rate"],
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    for client in (client_a, client_b):
        client.__exit__(None, None, None)
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
