"""What a new clinic hits on day one (issue 39): each rough edge, pinned at its cause."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from oncolens.accounts.mail import Mailer
from oncolens.app import create_app
from oncolens.cli.main import COMMAND_ORDER
from oncolens.cli.main import app as cli
from oncolens.config import Settings
from oncolens.decision import probability_columns
from oncolens.reports.pdf import ReportImage, build_case_pdf
from oncolens.store.db import make_engine
from oncolens.web.render import interval, rebuild_command
from oncolens.zoo.package import ModelPackage
from tests.api.test_auth_users import add_user, login
from tests.reports.test_builders import ASSESSMENT, case
from tests.web.test_pages import web_login

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), secret_key="day-one-key-long-enough-for-hs256-xx")
    with TestClient(create_app(settings)) as client:
        add_user(client, "admin@clinic.org", "admin")
        add_user(client, "doc@clinic.org", "clinician")
        yield client


# --- command line -----------------------------------------------------------------------------------


def test_help_lists_serve_first_and_the_training_commands_last() -> None:
    text = CliRunner().invoke(cli, ["--help"], terminal_width=200).output
    listed = [name for name in re.findall(r"^│ ([a-z-]+) ", text, re.M) if name in COMMAND_ORDER]
    assert listed[:4] == ["serve", "predict", "batch", "models"]
    assert listed.index("train") > listed.index("users") and listed.index("train") > listed.index("serve")


def test_a_port_out_of_range_is_a_message_not_a_traceback() -> None:
    result = CliRunner().invoke(cli, ["serve", "--port", "99999"])
    assert result.exit_code == 2 and "--port" in result.output and "Traceback" not in result.output


def test_users_list_speaks_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCOLENS_DATA_DIR", str(tmp_path))
    created = CliRunner().invoke(
        cli,
        ["users", "create", "--email", "chief@clinic.org", "--admin", "--password-stdin"],
        input="a-long-password-1\n",
    )
    assert created.exit_code == 0, created.output
    listed = CliRunner().invoke(cli, ["users", "list", "--json"])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert rows == [
        {
            "id": rows[0]["id"],
            "email": "chief@clinic.org",
            "role": "admin",
            "state": "active",
            "two_factor": False,
            "full_name": rows[0]["full_name"],
        }
    ]


def test_models_json_marks_an_unverified_licence_as_no_commercial_use() -> None:
    rows = {r["id"]: r for r in map(json.loads, CliRunner().invoke(cli, ["models", "--json"]).output.splitlines())}
    assert rows["breast-us"]["non_commercial"] is True  # "do not use commercially without checking"
    assert rows["breast-us"]["licence_flag"] == "licence unverified"


def test_evaluate_shows_progress_and_the_predictions_csv_has_one_column_per_name(tmp_path: Path) -> None:
    data = SAMPLES / "breast-us"  # three images with a manifest (test split)
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(cli, ["evaluate", "breast-us", str(data), "--split", "test", "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    assert "evaluating: 3/3 images" in result.output
    header = next(csv.reader(out.open()))
    assert len(header) == len(set(header)), header
    assert {"p_benign", "p_normal", "p_class_malignant", "p_malignant", "named_class", "risk_level"} <= set(header)
    columns = probability_columns(["benign", "malignant", "normal"])
    for row in csv.DictReader(out.open()):  # the named class is the most probable one, as the server says
        probs = {c: float(row[column]) for c, column in columns.items()}
        assert row["named_class"] == max(probs, key=lambda k: probs[k])


# --- settings ---------------------------------------------------------------------------------------


def test_a_postgres_url_as_hosting_services_write_it_means_psycopg(tmp_path: Path) -> None:
    for url in ("postgres://u@db:5432/x", "postgresql://u@db:5432/x"):
        assert Settings(data_dir=tmp_path, database_url=url).database_url == "postgresql+psycopg://u@db:5432/x"


def test_a_sqlite_file_under_a_missing_folder_is_refused_not_created(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"the folder .*nowhere of the SQLite database does not exist"):
        Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}")
    assert not (tmp_path / "nowhere").exists()
    inside = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'data' / 'x.db'}")
    assert inside.database_url  # the data folder itself is made at start-up


def test_a_missing_database_driver_names_the_extra_to_install() -> None:
    with pytest.raises(ImportError, match=r"pip install 'oncolens\[postgres\]'"):
        make_engine("mysql://u@db/x")


def test_mail_comes_from_the_public_host_not_the_relays_address(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, smtp_host="127.0.0.1", public_url="https://screening.clinic.org", clinic_name="Clinic"
    )
    assert Mailer(settings).sender == "Clinic <oncolens@screening.clinic.org>"


# --- pages ------------------------------------------------------------------------------------------


def test_the_dashboard_has_an_indeterminate_entry_and_whole_number_ticks(site: TestClient) -> None:
    admin = web_login(site, "admin@clinic.org")
    doc = TestClient(site.app)
    headers = login(site, "doc@clinic.org")
    sample = next((SAMPLES / "skin-ham10000").glob("*.jpg"))
    for _ in range(3):  # three cases today: an odd peak
        created = doc.post(
            "/api/v1/cases",
            data={"model_id": "skin-ham10000", "patient_ref": "D-1"},
            files={"files": (sample.name, sample.read_bytes())},
            headers=headers,
        )
        assert created.status_code == 201, created.text
    page = admin.get("/admin").text
    ticks = re.search(
        r'<div class="y-axis" aria-hidden="true"><span>(\d+)</span><span>(\d+)</span><span>0</span>', page
    )
    assert ticks and ticks.groups() == ("4", "2")
    assert '<span class="pill risk-indeterminate">indeterminate</span>' in page.split("Colours:")[1]
    assert 'href="/admin/audit"' in page
    recent = page.split("Recent audit events")[1]
    assert "image_view" not in recent and "heatmap_view" not in recent


def test_the_audit_trail_page_pages_and_hides_views_until_asked(site: TestClient) -> None:
    admin = web_login(site, "admin@clinic.org")
    case_id = admin.get("/cases").text.split('href="/cases/')[1].split('"')[0]
    admin.get(f"/cases/{case_id}")
    images = re.findall(rf'/cases/{case_id}/images/([0-9a-f]+)"', admin.get(f"/cases/{case_id}").text)
    admin.get(f"/cases/{case_id}/images/{images[0]}")
    hidden = admin.get("/admin/audit").text
    shown = admin.get("/admin/audit?views=true").text
    assert "image_view" not in hidden.split('data-testid="audit-events"')[1] and "(views hidden)" in hidden
    assert "image_view" in shown.split('data-testid="audit-events"')[1]
    only = admin.get("/admin/audit?action=create").text.split('data-testid="audit-events"')[1]
    assert "<td>create</td>" in only and "<td>login</td>" not in only
    doc = web_login(site, "doc@clinic.org")
    assert doc.get("/admin/audit").status_code == 403


def test_the_users_pages_actions_stay_inside_a_table_cell(site: TestClient) -> None:
    page = web_login(site, "admin@clinic.org").get("/admin/users").text
    assert '<td class="actions">' not in page and '<td><div class="actions">' in page
    css = (ROOT / "src/oncolens/web/static/app.css").read_text()
    assert "[hidden] { display: none !important; }" in css


def test_the_case_list_leads_with_risk_and_status_and_folds_its_filters(site: TestClient) -> None:
    page = web_login(site, "doc@clinic.org").get("/cases").text
    header = re.findall(r'<th scope="col">([^<]+)</th>', page.split("cases-table")[1])
    assert header[:3] == ["Case", "Risk", "Status"]
    assert '<details class="card filter-box" data-filters' in page


def test_the_analyze_page_says_which_dermoscopy_model_to_use(site: TestClient) -> None:
    page = web_login(site, "doc@clinic.org").get("/analyze").text
    chooser = page.split('data-testid="chooser-skin"')[1].split("</p>")[0]
    assert "skin-ham10000</strong>: 7 classes" in chooser and "skin-isic9</strong>: 8 classes" in chooser
    assert "squamous cell carcinoma" in chooser
    titles = re.findall(r"<strong>(Skin lesion[^<]+)</strong>", page)
    assert len(titles) == 2 and titles[0] != titles[1]


def test_the_model_page_is_clinician_first_with_sound_intervals_and_runnable_commands(site: TestClient) -> None:
    page = web_login(site, "doc@clinic.org").get("/models/skin-ham10000").text
    order = [
        page.index(marker)
        for marker in ("How good it is, in plain words", "When it gives no answer", "Technical details")
    ]
    assert order == sorted(order)
    assert "Of 100 melanomas, basal cell carcinomas and actinic keratoses (AKIEC) in the test images" in page
    assert ".devqat" not in page and "--run-dir" not in page
    assert interval(0.018, [0.019, 0.027]).startswith("0.019 \u2013 0.027 (the bootstrap resamples")
    assert interval(0.5, [0.4, 0.6]) == "0.400 \u2013 0.600"
    assert (
        rebuild_command("oncolens train d --out .devqat/x --run-dir runs/y", "m")
        == "oncolens train d --out zoo-rebuilt/m"
    )


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="needs poppler-utils")
def test_the_pdf_caption_describes_each_row_and_the_review_stays_on_one_page() -> None:
    card = ModelPackage.load(ROOT / "src/oncolens/zoo/oral-photo").card
    picture = Image.new("RGB", (64, 48), (200, 40, 40))
    images = [ReportImage(f"m{i}.jpg", picture, None, ASSESSMENT) for i in range(2)]
    pdf = build_case_pdf(case(reviewed=True), images, card, "Clinic X", reviewer="Dr A")
    text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    flat = " ".join(text.split())
    assert "Left:" not in flat and "Each row: the image as analysed" in flat
    pages = text.split("\f")
    holding = [i for i, p in enumerate(pages) if "Clinician review" in p]
    assert holding and "Confirmed diagnosis" in pages[holding[0]] and "Notes" in pages[holding[0]]
