"""The PDF case report (reportlab): everything a clinic files about one analysed case.

Header and patient, the model and its version, each image beside its heat-map overlay with its own
result, the aggregated result with the risk level and recommendation, the clinician review, the
model's test metrics and intended use, the decision-support disclaimer and the generation time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.platypus import (
    Flowable,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)
from reportlab.platypus import (
    Image as PdfImage,
)

from oncolens.api.records import CasePublic
from oncolens.api.schemas import AssessmentPublic

RISK_COLOURS = {"low": "#2e7d32", "borderline": "#b58900", "moderate": "#e65100", "high": "#c62828"}


@dataclass(frozen=True)
class ReportImage:
    filename: str
    image: Image.Image
    overlay: Image.Image | None
    result: AssessmentPublic


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("title", parent=base["Title"], fontSize=16, spaceAfter=4),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontSize=12, spaceBefore=8, spaceAfter=4),
        "body": ParagraphStyle("body", parent=base["BodyText"], fontSize=9, leading=12),
        "small": ParagraphStyle("small", parent=base["BodyText"], fontSize=7.5, leading=10, textColor="#444444"),
        "warn": ParagraphStyle(
            "warn",
            parent=base["BodyText"],
            fontSize=9,
            leading=12,
            textColor="#7a1f1f",
            backColor="#fdecea",
            borderPadding=4,
        ),
    }


def _pdf_image(image: Image.Image, max_w: float, max_h: float) -> PdfImage:
    buffer = io.BytesIO()
    thumb = image.convert("RGB")
    thumb.thumbnail((600, 600))
    thumb.save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    scale = min(max_w / thumb.width, max_h / thumb.height)
    return PdfImage(buffer, width=thumb.width * scale, height=thumb.height * scale)


def _table(rows: list[list[Any]], widths: list[float], header: bool = True) -> Table:
    table = Table(rows, colWidths=widths, hAlign="LEFT")
    style = [
        ("FONTSIZE", (0, 0), (-1, -1), 8.5),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#bbbbbb")),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
    ]
    if header:
        style += [
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef5")),
            ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
        ]
    table.setStyle(TableStyle(style))
    return table


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _metric_rows(card: dict[str, Any]) -> list[list[str]]:
    metrics = card.get("metrics", {})
    rows = [["test metric", "value", "95% interval"]]
    for key, label in (
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("macro_auc", "macro AUROC"),
        ("ece", "calibration error (ECE)"),
    ):
        if key in metrics:
            low, high = metrics["intervals"][key]
            rows.append([label, _fmt(metrics[key]), f"{_fmt(low)} - {_fmt(high)}"])
    malignant = metrics.get("malignant")
    if malignant:
        for key in ("sensitivity", "specificity", "auc"):
            low, high = malignant["intervals"][key]
            rows.append([f"malignant vs benign {key}", _fmt(malignant[key]), f"{_fmt(low)} - {_fmt(high)}"])
    return rows


def build_case_pdf(
    case: CasePublic,
    images: list[ReportImage],
    card: dict[str, Any] | None,
    clinic: str,
    reviewer: str | None = None,
    note: str | None = None,
) -> bytes:
    """The report as PDF bytes. ``card`` is the model card (None if the model is no longer installed)."""
    s = _styles()
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    classes = {c["id"]: c for c in (card or {}).get("classes", [])}
    story: list[Flowable] = [
        Paragraph(escape(clinic), s["small"]),
        Paragraph("Image screening report", s["title"]),
        Paragraph(f"Case {escape(case.id)} &middot; analysed {case.created_at:%Y-%m-%d %H:%M} UTC", s["body"]),
        Spacer(1, 4),
        Paragraph(escape(case.disclaimer), s["warn"]),
    ]

    p = case.patient
    patient = [
        ("Patient reference", p.ref),
        ("Name", p.name),
        ("Age", "" if p.age is None else str(p.age)),
        ("Sex", p.sex),
        ("E-mail", p.email),
    ]
    story.append(Paragraph("Patient", s["h2"]))
    rows = [[k, escape(v)] for k, v in patient if v]
    story.append(_table(rows or [["Patient", "(no patient fields stored)"]], [4 * cm, 12 * cm], header=False))
    if p.clinical_notes:
        story.append(Paragraph(f"<b>Clinical notes:</b> {escape(p.clinical_notes)}", s["body"]))

    title = (card or {}).get("title", case.model_id)
    story.append(Paragraph("Model", s["h2"]))
    story.append(
        Paragraph(
            f"{escape(title)} &mdash; <b>{escape(case.model_id)}</b> version {escape(case.model_version)}"
            + (f" &middot; {escape(card.get('modality', ''))}" if card else ""),
            s["body"],
        )
    )

    r = case.result
    colour = RISK_COLOURS.get(r.risk_level, "#000000")
    story.append(Paragraph("Result", s["h2"]))
    story.append(
        Paragraph(
            f"Risk level: <font color='{colour}'><b>{escape(r.risk_level.upper())}</b></font> &middot; "
            f"P(malignant) {r.p_malignant:.3f} &middot; most likely: <b>{escape(r.top_class_name)}</b> "
            f"({r.confidence:.1%})"
            + (
                f" &middot; {len(case.images)} images combined by rule '{escape(case.aggregation_rule)}'"
                if len(case.images) > 1
                else ""
            ),
            s["body"],
        )
    )
    story.append(Paragraph(f"<b>Recommendation:</b> {escape(r.recommendation)}", s["body"]))
    prob_rows = [["class", "probability", ""]]
    for class_id, prob in sorted(r.probabilities.items(), key=lambda kv: -kv[1]):
        info = classes.get(class_id, {})
        name = info.get("name", class_id)
        prob_rows.append([escape(name), f"{prob:.3f}", "malignant class" if info.get("malignant") else ""])
    story.append(Spacer(1, 4))
    story.append(_table(prob_rows, [8 * cm, 3 * cm, 5 * cm]))

    story.append(Paragraph("Images", s["h2"]))
    if note:
        story.append(Paragraph(escape(note), s["small"]))
    for index, item in enumerate(images, start=1):
        res = item.result
        pictures: list[Any] = [_pdf_image(item.image, 6 * cm, 5 * cm)]
        pictures.append(
            _pdf_image(item.overlay, 6 * cm, 5 * cm)
            if item.overlay is not None
            else Paragraph("no heat-map", s["small"])
        )
        text = Paragraph(
            f"<b>{index}. {escape(item.filename or 'image')}</b>"
            f"<br/>{escape(res.top_class_name)} ({res.confidence:.1%})"
            f"<br/>P(malignant) {res.p_malignant:.3f}<br/>risk: {escape(res.risk_level)}",
            s["body"],
        )
        block = Table([[pictures[0], pictures[1], text]], colWidths=[6.3 * cm, 6.3 * cm, 4.4 * cm], hAlign="LEFT")
        block.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP")]))
        story.append(KeepTogether([block, Spacer(1, 6)]))
    story.append(
        Paragraph(
            "Left: the image as analysed. Middle: where the model looked (class-activation heat-map of its top class).",
            s["small"],
        )
    )

    review = case.review
    story.append(Paragraph("Clinician review", s["h2"]))
    review_rows = [
        ["Status", review.status],
        ["Reviewed by", reviewer or ("" if review.reviewed_by is None else f"user {review.reviewed_by}")],
        ["Reviewed at", "" if review.reviewed_at is None else f"{review.reviewed_at:%Y-%m-%d %H:%M} UTC"],
        ["Confirmed diagnosis", review.confirmed_diagnosis],
        ["Notes", review.notes],
    ]
    story.append(
        _table([[k, Paragraph(escape(v or "-"), s["body"])] for k, v in review_rows], [4 * cm, 12 * cm], header=False)
    )

    story.append(Paragraph("About the model", s["h2"]))
    if card:
        story.append(Paragraph(f"<b>Intended use:</b> {escape(card.get('intended_use', ''))}", s["body"]))
        story.append(Spacer(1, 4))
        story.append(_table(_metric_rows(card), [7 * cm, 3 * cm, 4 * cm]))
        n = card.get("metrics", {}).get("n")
        data = card.get("dataset", {})
        story.append(
            Paragraph(
                f"Measured on {n} held-out test images of {escape(data.get('title', data.get('name', '')))}. "
                f"Data licence: {escape(data.get('license', 'unknown'))}",
                s["small"],
            )
        )
        for limitation in card.get("limitations", [])[:4]:
            story.append(Paragraph(f"&bull; {escape(limitation)}", s["small"]))
    else:
        story.append(
            Paragraph(f"Model {escape(case.model_id)} is no longer installed; its card is not available.", s["body"])
        )

    story.append(Spacer(1, 8))
    story.append(Paragraph(escape(case.disclaimer), s["warn"]))
    story.append(Paragraph(f"Generated {generated} by OncoLens.", s["small"]))

    buffer = io.BytesIO()

    def footer(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(
            1.5 * cm, 1 * cm, f"OncoLens case {case.id} - decision support, not a diagnosis - generated {generated}"
        )
        canvas.drawRightString(A4[0] - 1.5 * cm, 1 * cm, f"page {doc.page}")
        canvas.restoreState()

    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=1.5 * cm,
        rightMargin=1.5 * cm,
        topMargin=1.5 * cm,
        bottomMargin=1.6 * cm,
        title=f"OncoLens case {case.id}",
        author=clinic,
        subject="Image screening report",
    )
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buffer.getvalue()
