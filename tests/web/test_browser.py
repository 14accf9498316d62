"""The web app in a real browser: Playwright driving Debian's Chromium against a live server.

Set ONCOLENS_SCREENSHOTS=docs/screenshots to (re)write the README's screenshots while testing.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from oncolens.config import Settings
from oncolens.zoo import BUILTIN_DIR
from tests.live import PASSWORD, live_server

CHROMIUM = "/usr/bin/chromium"
SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
SHOTS = os.environ.get("ONCOLENS_SCREENSHOTS")
# A function, not an expression: the pages' CSP forbids eval, which Playwright uses to poll expressions.
LOADED = "() => Array.from(document.querySelectorAll('{}')).every(i => i.complete && i.naturalWidth > 0)"

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("web"), clinic_name="Hillside Clinic")
    users = {"admin@clinic.org": "admin", "ana@clinic.org": "clinician", "vic@clinic.org": "viewer"}
    with live_server(settings, users) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def page_for(browser: object, server: str, email: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.csp_violations = []
    page.on(
        "console",
        lambda m: page.csp_violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(f"{server}/cases")
    assert "/login" in page.url, "pages need a login"
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/cases")
    return page


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def analysed(browser: object, server: str) -> dict[str, str]:
    """A clinician analyses two sample images in the browser; returns the case id and page text."""
    page = page_for(browser, server, "ana@clinic.org")
    page.goto(f"{server}/analyze")
    page.check("input[name=model_id][value=skin-ham10000]")
    page.set_input_files("#files", [str(SAMPLES / "ISIC_0025316.jpg"), str(SAMPLES / "ISIC_0026213.jpg")])
    assert page.locator("[data-previews] img").count() == 2, "both images are previewed before upload"
    page.fill("input[name=patient_ref]", "PT-2001")
    page.fill("input[name=patient_age]", "58")
    shot(page, "analyze-form")
    page.click("[data-analyze-form] button[type=submit]")
    page.wait_for_selector("[data-testid=bar-chart]")
    page.wait_for_function(LOADED.format("main img"))
    shot(page, "analyze-result")
    page.wait_for_selector("[data-heat-stack].loading", state="detached")
    assert page.locator("[data-heat-stack]").count() == 2, "each heat-map replaced its placeholder"
    case_id = page.locator("[data-testid=case-link]").inner_text()
    assert page.csp_violations == [], "the pages run under their Content-Security-Policy"
    return {"case_id": case_id, "text": page.locator("main").inner_text()}


def test_analyze_two_images_shows_chart_risk_and_heatmaps(
    browser: object, server: str, analysed: dict[str, str]
) -> None:
    page = page_for(browser, server, "ana@clinic.org")
    page.goto(f"{server}/cases/{analysed['case_id']}")
    bars = page.locator("[data-testid=bar-chart] li")
    assert bars.count() == 7
    values = [float(v.rstrip("%")) for v in page.locator("[data-testid=bar-chart] .value").all_inner_texts()]
    assert values == sorted(values, reverse=True) and abs(sum(values) - 100) < 1.0
    assert page.locator("[data-testid=bar-chart] li.malignant").count() == 3, "akiec, bcc and mel are marked"
    risk = page.locator("[data-testid=risk-level] strong").inner_text().lower()
    assert risk in {"low", "borderline", "moderate", "high"}
    assert risk in analysed["text"].lower() and f"Risk level {risk}: " in analysed["text"]
    assert "Decision support only, not a diagnosis" in analysed["text"]
    heatmaps = page.locator("[data-testid=heatmap]")
    assert heatmaps.count() == 2
    page.wait_for_function(LOADED.format("img.heat"))
    slider = page.locator("[data-heat-slider]").first
    slider.fill("90")
    assert heatmaps.first.evaluate("img => img.style.opacity") == "0.9"
    assert page.locator("dl.classes dt").count() == 7, "class descriptions are shown"
    shot(page, "case")


def test_the_stored_case_takes_a_review(browser: object, server: str, analysed: dict[str, str]) -> None:
    page = page_for(browser, server, "ana@clinic.org")
    page.goto(f"{server}/cases")
    page.click(f"a[href='/cases/{analysed['case_id']}']")
    page.select_option("select[name=status]", "confirmed")
    page.fill("input[name=confirmed_diagnosis]", "melanoma, histology pending")
    page.fill("textarea[name=review_notes]", "Excision booked.")
    page.click("[data-testid=review-form] button[type=submit]")
    page.wait_for_selector("[data-testid=saved]")
    assert page.locator("[data-testid=status]").inner_text() == "confirmed"
    assert "melanoma, histology pending" in page.locator("main").inner_text()
    with page.expect_download() as download:
        page.click("[data-testid=pdf]")
    assert download.value.suggested_filename == f"oncolens-case-{analysed['case_id']}.pdf"


def test_a_viewer_cannot_review(browser: object, server: str, analysed: dict[str, str]) -> None:
    page = page_for(browser, server, "vic@clinic.org")
    page.goto(f"{server}/cases/{analysed['case_id']}")
    assert page.locator("[data-testid=review-form]").count() == 0
    assert "but not review it" in page.locator("main").inner_text()
    # a hand-made form post is refused by the server too
    status = page.evaluate(
        """async (id) => {
            const csrf = document.querySelector('input[name=csrf_token]').value;
            const body = new URLSearchParams({status: 'reviewed', csrf_token: csrf});
            const r = await fetch(`/cases/${id}/review`, {method: 'POST', body});
            return r.status;
        }""",
        analysed["case_id"],
    )
    assert status == 403
    page.goto(f"{server}/analyze")
    assert page.locator("button[type=submit]:disabled").count() == 1


def test_the_model_page_shows_the_cards_metrics(browser: object, server: str) -> None:
    card = json.loads((BUILTIN_DIR / "skin-ham10000" / "card.json").read_text())
    page = page_for(browser, server, "ana@clinic.org")
    page.goto(f"{server}/models")
    page.click("a[href='/models/skin-ham10000']")
    assert "Of 100 melanomas" in page.locator("[data-testid=plain-words]").inner_text()
    page.click("[data-testid=technical] summary")  # the statistics wait under "technical details"
    table = page.locator("[data-testid=metrics]").inner_text()
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece"):
        assert f"{card['metrics'][key]:.3f}" in table
    low, high = card["metrics"]["intervals"]["accuracy"]
    assert f"{low:.3f} \u2013 {high:.3f}" in table
    assert "non-commercial" in page.locator("main").inner_text()
    page.wait_for_function(LOADED.format(".figures img"))
    shot(page, "model")


def test_an_invalid_file_shows_the_error(browser: object, server: str, tmp_path: Path) -> None:
    page = page_for(browser, server, "ana@clinic.org")
    page.goto(f"{server}/analyze")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page.set_input_files("#files", str(text))
    assert "Not an image OncoLens can read: notes.txt" in page.locator("[data-file-error]").inner_text()
    disguised = tmp_path / "lesion.jpg"
    disguised.write_bytes(b"this is text pretending to be a JPEG")
    page.check("input[name=model_id][value=skin-ham10000]")
    page.set_input_files("#files", str(disguised))
    page.fill("input[name=patient_ref]", "PT-9")
    assert not page.locator("[data-upload]").is_visible(), "nothing is sent yet: no progress bar"
    page.click("[data-analyze-form] button[type=submit]")
    page.wait_for_selector("[data-submit-error]:not([hidden])")
    assert not page.locator("[data-upload]").is_visible(), "after a refusal the bar and 'Analyzing…' are gone"
    assert "Analyzing" not in page.locator("[data-analyze-form]").inner_text()
    error = page.locator("[data-submit-error]").inner_text()
    assert "not an image OncoLens can read" in error
    assert "Traceback" not in page.content()
    assert page.input_value("input[name=patient_ref]") == "PT-9", "the form keeps what was typed"
    assert page.eval_on_selector("#files", "i => i.files.length") == 1, "and the chosen file"
    assert page.locator("[data-analyze-form] button[type=submit]").is_enabled()
    # a thyroid ultrasound frame sent to the dermoscopy model: not this modality
    page.check("input[name=model_id][value=skin-ham10000]")
    thyroid = Path(__file__).parents[2] / "samples" / "thyroid-us" / "ddti_10_1.jpg"
    page.set_input_files("#files", str(thyroid))
    page.click("[data-analyze-form] button[type=submit]")
    page.wait_for_function("() => document.querySelector('[data-submit-error]').textContent.includes('greyscale')")
    assert "greyscale image with no colour at all" in page.locator("[data-submit-error]").inner_text()


def test_admin_dashboard_and_filters(browser: object, server: str, analysed: dict[str, str]) -> None:
    page = page_for(browser, server, "admin@clinic.org")
    page.goto(f"{server}/admin")
    assert int(page.locator("[data-testid=total-cases]").inner_text()) >= 1
    assert "review" in page.locator("main").inner_text()
    today = page.locator(".timeline .day").last
    assert today.locator("i").count() >= 1, "today's cases are drawn, coloured by risk level"
    assert "moderate" in (today.get_attribute("title") or "")
    shot(page, "dashboard")
    page.goto(f"{server}/cases?patient_ref=PT-2001")
    assert page.locator("[data-testid=total]").inner_text() == "1 case"
    page.goto(f"{server}/cases?patient_ref=nobody")
    assert page.locator("[data-testid=total]").inner_text() == "0 cases"
    page.goto(f"{server}/cases")
    shot(page, "cases")
    page.context.clear_cookies()
    page.goto(f"{server}/login")
    shot(page, "login")


def test_two_factor_enrolment_and_sign_in_in_the_browser(browser: object, server: str) -> None:
    from oncolens.accounts import totp

    page = page_for(browser, server, "vic@clinic.org")
    page.click("nav >> text=Account")
    page.click("text=Set up an authenticator app")
    page.wait_for_selector("[data-testid=qr] svg")
    assert page.locator("[data-testid=qr] svg").bounding_box()["width"] >= 150  # type: ignore[index]
    secret = page.locator("[data-testid=totp-secret]").inner_text()
    shot(page, "account-2fa")
    # the step after the current one is valid too (clock drift), and is never the one used below
    import time

    now = time.time()
    page.fill("#enable_code", totp.code_at(secret, now))
    page.click("text=Turn on")
    page.wait_for_selector("[data-testid=recovery-codes]")
    assert page.locator("[data-testid=recovery-codes] li").count() == 10
    assert page.csp_violations == [], "the QR code and the page run under the Content-Security-Policy"
    page.context.clear_cookies()
    page.goto(f"{server}/cases")
    page.fill("#email", "vic@clinic.org")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Two-factor sign-in")
    page.fill("#code", totp.code_at(secret, now + totp.STEP_S))
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/cases")
    assert "Cases" in page.locator("h1").inner_text()


def test_the_api_docs_render_their_operations_with_the_network_blocked(browser: object, server: str) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    elsewhere: list[str] = []

    def only_this_server(route):  # type: ignore[no-untyped-def]
        if route.request.url.startswith(server):
            return route.continue_()
        elsewhere.append(route.request.url)
        return route.abort()

    page.route("**/*", only_this_server)
    page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock")
    assert page.locator(".opblock").count() >= 30, "Swagger UI lists the operations"
    assert page.get_by_text("/api/v1/auth/token", exact=True).count() >= 1
    page.goto(f"{server}/redoc")
    page.wait_for_selector("text=OncoLens API")
    page.wait_for_selector("[data-section-id]")
    assert page.locator("[data-section-id]").count() >= 10, "ReDoc lists the operations"
    assert elsewhere == [], f"the docs asked for other hosts: {elsewhere}"
    context.close()


PHONE, TABLET = {"width": 390, "height": 844}, {"width": 768, "height": 1024}


@pytest.mark.parametrize("viewport", [PHONE, TABLET], ids=["phone-390", "tablet-768"])
def test_no_page_scrolls_sideways_on_a_phone_or_a_tablet(
    browser: object, server: str, analysed: dict[str, str], viewport: dict[str, int]
) -> None:
    context = browser.new_context(viewport=viewport)  # type: ignore[attr-defined]
    page = context.new_page()
    pages = ["/login", "/forgot-password", "/signup", "/reset-password?token=expired", "/invite?token=x", "/docs"]
    for path in pages:
        page.goto(server + path)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"], path
    page.goto(f"{server}/login?next=/analyze")
    page.fill("#email", "admin@clinic.org")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/analyze")
    case = analysed["case_id"]
    logged_in = ["/analyze", "/cases", f"/cases/{case}", "/models", "/models/skin-ham10000", "/models/thyroid-us",
                 "/admin", "/admin/users", "/account"]  # fmt: skip
    name = "phone" if viewport is PHONE else "tablet"
    for path in logged_in:
        page.goto(server + path)
        if path.startswith("/cases/"):
            page.wait_for_selector("[data-heat-stack].loading", state="detached")
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"{path} is {width} px wide at {viewport['width']} px"
        nav = page.locator("header.top").bounding_box()
        assert nav is not None and nav["x"] + nav["width"] <= viewport["width"] + 1, f"{path}: the header overflows"
        shots = {"/analyze": "phone-analyze", f"/cases/{case}": "phone-case", "/cases": "phone-cases"}
        if name == "phone" and path in shots:
            shot(page, shots[path])
    assert page.locator("text=Log out").is_visible() and page.locator("nav >> text=Dashboard").is_visible()
    context.close()


# --- issue 39: the upload bar, the one statement, accessibility, screenshots ----------------------------

AXE = Path(__file__).parent / "vendor" / "axe.min.js"


def test_the_result_page_states_the_one_statement_and_an_indeterminate_one_names_no_class(
    browser: object, server: str, analysed: dict[str, str]
) -> None:
    page = page_for(browser, server, "ana@clinic.org")
    page.goto(f"{server}/cases/{analysed['case_id']}")
    statement = page.locator("[data-testid=statement]").inner_text()
    assert statement.startswith("Risk level ") and "Most likely class: " in statement
    page.goto(f"{server}/analyze")
    page.check("input[name=model_id][value=skin-ham10000]")
    cell = Path(__file__).parents[2] / "samples" / "cervical-herlev"
    page.set_input_files("#files", str(sorted(cell.glob("*.jpg"))[0]))
    page.fill("input[name=patient_ref]", "PT-OOD")
    page.click("[data-analyze-form] button[type=submit]")
    page.wait_for_selector("[data-testid=ood-notice]")
    assert "Choose the model for this kind of image" in page.locator("[data-testid=ood-notice]").inner_text()
    assert not page.locator("[data-testid=bar-chart]").is_visible(), "the probabilities wait behind 'show anyway'"
    assert "Most likely class" not in page.locator("main").inner_text()
    page.click("[data-testid=show-anyway] summary")
    assert page.locator("[data-testid=bar-chart]").is_visible()


def signed_in(browser: object, server: str, email: str | None, width: int, height: int, **options: object):  # type: ignore[no-untyped-def]
    """A page in a new browser context of the given size, signed in as ``email`` (None: anonymous)."""
    context = browser.new_context(viewport={"width": width, "height": height}, **options)  # type: ignore[attr-defined]
    page = context.new_page()
    if email:
        page.goto(f"{server}/login")
        page.fill("#email", email)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state()
    return page


def axe_violations(browser: object, server: str, email: str | None, paths: list[str], width: int = 1280) -> dict:
    """Serious and critical axe-core (WCAG 2 A/AA) violations of each page, as {path: [rule ids]}."""
    page = signed_in(browser, server, email, width, 900, bypass_csp=True)
    context = page.context
    found = {}
    for path in paths:
        page.goto(f"{server}{path}")
        page.add_script_tag(path=str(AXE))
        results = page.evaluate(
            "async () => (await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', "
            "'best-practice']}})).violations.filter(v => ['serious', 'critical'].includes(v.impact) || "
            "v.id === 'heading-order')"
            ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).slice(0, 3).join(', '))"
        )
        if results:
            found[path] = results
    context.close()
    return found


def test_no_page_has_a_serious_or_critical_accessibility_violation(
    browser: object, server: str, analysed: dict[str, str]
) -> None:
    anonymous = ["/login", "/forgot-password", "/signup"]
    pages = ["/analyze", "/cases", f"/cases/{analysed['case_id']}", "/models", "/models/skin-ham10000", "/account"]
    admin = ["/admin", "/admin/users", "/admin/audit"]
    found = axe_violations(browser, server, None, anonymous)
    found |= axe_violations(browser, server, "ana@clinic.org", pages)
    found |= axe_violations(browser, server, "admin@clinic.org", admin)
    found |= {f"{k} (phone)": v for k, v in axe_violations(browser, server, "ana@clinic.org", pages[2:5], 390).items()}
    assert found == {}


def test_screenshots_of_the_result_and_model_pages_on_a_desktop_and_a_phone(
    browser: object, server: str, analysed: dict[str, str]
) -> None:
    for width, height, suffix in ((1280, 900, "desktop"), (390, 844, "phone")):
        page = signed_in(browser, server, "ana@clinic.org", width, height)
        context = page.context
        page.goto(f"{server}/cases/{analysed['case_id']}")
        page.wait_for_function(LOADED.format("main img"))
        assert page.locator("[data-testid=statement]").is_visible()
        shot(page, f"result-{suffix}")
        page.goto(f"{server}/models/skin-ham10000")
        assert page.locator("[data-testid=plain-words]").is_visible()
        shot(page, f"model-{suffix}")
        context.close()
