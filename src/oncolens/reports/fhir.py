"""FHIR R4 export of a case: a collection Bundle of DiagnosticReport, Observations, Patient and Media.

References between the resources use ``urn:uuid:`` full URLs derived from the case (the same case
always gives the same ids). The Patient holds only what OncoLens stored (reference, name, sex,
e-mail); the age is an Observation, as FHIR's Patient has a birth date, not an age. Each image is a
Media resource whose content URL points at the authenticated image endpoint. The report is
``preliminary`` until a clinician has reviewed it, then ``final``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from oncolens.reports import reference_words
from oncolens.store.views import CaseImagePublic, CasePublic
from oncolens.zoo.card import ModelCard

NAMESPACE = uuid.UUID("5b7d0e4e-4f0f-4a55-9a39-0c7f8f1f5e21")
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM = "http://unitsofmeasure.org"
GENDERS = {"female": "female", "male": "male", "other": "other", "unknown": "unknown"}


def _urn(case_id: str, *parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(NAMESPACE, "/".join((case_id, *parts))))


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat(timespec="seconds")


def _patient(case: CasePublic) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient"}
    p = case.patient
    if p.ref:
        patient["identifier"] = [{"system": "urn:oncolens:patient-ref", "value": p.ref}]
    if p.name:
        patient["name"] = [{"text": p.name}]
    if p.sex in GENDERS:
        patient["gender"] = GENDERS[p.sex]
    if p.email:
        patient["telecom"] = [{"system": "email", "value": p.email}]
    return patient


def _media(case: CasePublic, image: CaseImagePublic, subject: dict[str, str], base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Media",
        "status": "completed",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}]},
        "subject": subject,
        "createdDateTime": _iso(case.created_at),
        "width": image.width,
        "height": image.height,
        "content": {
            "contentType": image.media_type,
            "url": base_url.rstrip("/") + image.url,
            "size": image.size_bytes,
            "title": image.filename or f"image {image.position + 1}",
        },
    }


def _probability(value: float) -> dict[str, Any]:
    return {"valueQuantity": {"value": round(value, 6), "unit": "probability", "system": UCUM, "code": "1"}}


def _observation_values(case: CasePublic, card: ModelCard | None) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(key, code, value) of each Observation: every class probability, P(malignant), risk level, age."""
    system = f"urn:oncolens:model:{case.model_id}"
    r = case.result
    values = []
    for class_id, probability in sorted(r.probabilities.items(), key=lambda kv: -kv[1]):
        info = card.class_info(class_id) if card else None
        name = info.name if info else class_id
        code = {"coding": [{"system": system, "code": class_id, "display": name}], "text": f"Probability: {name}"}
        values.append((f"p-{class_id}", code, _probability(probability)))
    malignant = {"coding": [{"system": system, "code": "p_malignant"}], "text": "Probability of a malignant class"}
    values.append(("p-malignant", malignant, _probability(r.p_malignant)))
    risk = {"coding": [{"system": "urn:oncolens:risk", "code": "risk_level"}], "text": "OncoLens risk level"}
    level = {
        "valueCodeableConcept": {
            "coding": [{"system": "urn:oncolens:risk-level", "code": r.risk_level}],
            "text": r.risk_level,
        },
        "note": [{"text": r.recommendation}],
    }
    values.append(("risk-level", risk, level))
    if case.patient.age is not None:
        age = {"coding": [{"system": "http://loinc.org", "code": "30525-0", "display": "Age"}], "text": "Age"}
        values.append(
            ("age", age, {"valueQuantity": {"value": case.patient.age, "unit": "years", "system": UCUM, "code": "a"}})
        )
    return values


def _observation(
    case: CasePublic, code: dict[str, Any], value: dict[str, Any], subject: dict[str, str], media: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": _status(case),
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": code,
        "subject": subject,
        "effectiveDateTime": _iso(case.created_at),
        "derivedFrom": media,
        "device": {"display": f"OncoLens model {case.model_id} v{case.model_version}"},
    } | value


def _status(case: CasePublic) -> str:
    """``preliminary`` until a clinician has reviewed the case, then ``final``."""
    return "preliminary" if case.review.status == "pending_review" else "final"


def _report(
    case: CasePublic,
    card: ModelCard | None,
    subject: dict[str, str],
    results: list[dict[str, str]],
    media: list[dict[str, str]],
) -> dict[str, Any]:
    r = case.result
    conclusion = r.statement
    if r.note:
        conclusion += f" Note: {r.note}."
    warnings = [f"image {i.position + 1}: {q.message}" for i in case.images for q in i.result.quality]
    if warnings:
        conclusion += " Image quality: " + " ".join(warnings)
    if case.review.confirmed_diagnosis:
        conclusion += f" Clinician's confirmed diagnosis: {case.review.confirmed_diagnosis}."
    if case.reference_class:
        conclusion += f" Reference diagnosis: {reference_words(case, card)}."
    return {
        "resourceType": "DiagnosticReport",
        "status": _status(case),
        "code": {"text": f"AI-assisted image screening: {card.title if card else case.model_id}"},
        "subject": subject,
        "effectiveDateTime": _iso(case.created_at),
        "issued": _iso(datetime.now(UTC)),
        "result": results,
        "media": [
            {"comment": image.filename or f"image {image.position + 1}", "link": ref}
            for image, ref in zip(case.images, media, strict=True)
        ],
        "conclusion": f"{conclusion} {case.disclaimer}",
    }


def _reference_observation(case: CasePublic, card: ModelCard | None, subject: dict[str, str]) -> dict[str, Any]:
    """The clinician's reference diagnosis (not the model's result): the class, how and when it was established."""
    info = card.class_info(case.reference_class or "") if card else None
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {
            "coding": [{"system": "urn:oncolens:reference", "code": "reference_class"}],
            "text": "Reference diagnosis",
        },
        "subject": subject,
        "valueCodeableConcept": {
            "coding": [
                {
                    "system": f"urn:oncolens:model:{case.model_id}",
                    "code": case.reference_class,
                    "display": info.name if info else case.reference_class,
                }
            ],
            "text": info.name if info else case.reference_class,
        },
    }
    if case.reference_standard:
        observation["method"] = {
            "coding": [{"system": "urn:oncolens:reference-standard", "code": case.reference_standard}],
            "text": case.reference_standard.replace("_", " "),
        }
    if case.reference_date:
        observation["effectiveDateTime"] = case.reference_date.isoformat()
    return observation


def case_bundle(case: CasePublic, card: ModelCard | None, base_url: str) -> dict[str, Any]:
    """The case as a FHIR R4 Bundle (type collection), as plain JSON-ready dicts."""
    subject = {"reference": _urn(case.id, "patient")}
    entries: list[dict[str, Any]] = [{"fullUrl": subject["reference"], "resource": _patient(case)}]
    media = []
    for image in case.images:
        ref = _urn(case.id, "media", image.id)
        media.append({"reference": ref})
        entries.append({"fullUrl": ref, "resource": _media(case, image, subject, base_url)})
    results = []
    for key, code, value in _observation_values(case, card):
        ref = _urn(case.id, "observation", key)
        entries.append({"fullUrl": ref, "resource": _observation(case, code, value, subject, media)})
        results.append({"reference": ref})
    if case.reference_class:
        entries.append({"fullUrl": _urn(case.id, "reference"), "resource": _reference_observation(case, card, subject)})
    report = {"fullUrl": _urn(case.id, "report"), "resource": _report(case, card, subject, results, media)}
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, case.id)),
        "type": "collection",
        "timestamp": _iso(datetime.now(UTC)),
        "entry": [report, *entries],
    }
