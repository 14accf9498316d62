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

from oncolens.api.records import CasePublic

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


def case_bundle(case: CasePublic, card: dict[str, Any] | None, base_url: str) -> dict[str, Any]:
    """The case as a FHIR R4 Bundle (type collection), as plain JSON-ready dicts."""
    status = "preliminary" if case.review.status == "pending_review" else "final"
    effective = _iso(case.created_at)
    patient_ref = {"reference": _urn(case.id, "patient")}
    system = f"urn:oncolens:model:{case.model_id}"
    names = {c["id"]: c["name"] for c in (card or {}).get("classes", [])}
    entries: list[dict[str, Any]] = []

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
    entries.append({"fullUrl": patient_ref["reference"], "resource": patient})

    media_refs = []
    for image in case.images:
        ref = _urn(case.id, "media", image.id)
        media_refs.append({"reference": ref})
        entries.append(
            {
                "fullUrl": ref,
                "resource": {
                    "resourceType": "Media",
                    "status": "completed",
                    "type": {
                        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}]
                    },
                    "subject": patient_ref,
                    "createdDateTime": effective,
                    "width": image.width,
                    "height": image.height,
                    "content": {
                        "contentType": image.media_type,
                        "url": base_url.rstrip("/") + image.url,
                        "size": image.size_bytes,
                        "title": image.filename or f"image {image.position + 1}",
                    },
                },
            }
        )

    def observation(key: str, code: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        ref = _urn(case.id, "observation", key)
        resource = {
            "resourceType": "Observation",
            "status": status,
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
            "code": code,
            "subject": patient_ref,
            "effectiveDateTime": effective,
            "derivedFrom": media_refs,
            "device": {"display": f"OncoLens model {case.model_id} v{case.model_version}"},
        } | value
        entries.append({"fullUrl": ref, "resource": resource})
        return {"reference": ref}

    r = case.result
    results = []
    for class_id, probability in sorted(r.probabilities.items(), key=lambda kv: -kv[1]):
        name = names.get(class_id, class_id)
        results.append(
            observation(
                f"p-{class_id}",
                {"coding": [{"system": system, "code": class_id, "display": name}], "text": f"Probability: {name}"},
                {"valueQuantity": {"value": round(probability, 6), "unit": "probability", "system": UCUM, "code": "1"}},
            )
        )
    results.append(
        observation(
            "p-malignant",
            {"coding": [{"system": system, "code": "p_malignant"}], "text": "Probability of a malignant class"},
            {"valueQuantity": {"value": round(r.p_malignant, 6), "unit": "probability", "system": UCUM, "code": "1"}},
        )
    )
    results.append(
        observation(
            "risk-level",
            {"coding": [{"system": "urn:oncolens:risk", "code": "risk_level"}], "text": "OncoLens risk level"},
            {
                "valueCodeableConcept": {
                    "coding": [{"system": "urn:oncolens:risk-level", "code": r.risk_level}],
                    "text": r.risk_level,
                },
                "note": [{"text": r.recommendation}],
            },
        )
    )
    if p.age is not None:
        age = {"coding": [{"system": "http://loinc.org", "code": "30525-0", "display": "Age"}], "text": "Age"}
        results.append(
            observation("age", age, {"valueQuantity": {"value": p.age, "unit": "years", "system": UCUM, "code": "a"}})
        )

    conclusion = f"Risk level {r.risk_level}: {r.recommendation} Most likely: {r.top_class_name} ({r.confidence:.1%})."
    if case.review.confirmed_diagnosis:
        conclusion += f" Clinician's confirmed diagnosis: {case.review.confirmed_diagnosis}."
    report = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"text": f"AI-assisted image screening: {(card or {}).get('title', case.model_id)}"},
        "subject": patient_ref,
        "effectiveDateTime": effective,
        "issued": _iso(datetime.now(UTC)),
        "result": results,
        "media": [
            {"comment": image.filename or f"image {image.position + 1}", "link": ref}
            for image, ref in zip(case.images, media_refs, strict=True)
        ],
        "conclusion": f"{conclusion} {case.disclaimer}",
    }
    report_ref = _urn(case.id, "report")
    entries.insert(0, {"fullUrl": report_ref, "resource": report})
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, case.id)),
        "type": "collection",
        "timestamp": _iso(datetime.now(UTC)),
        "entry": entries,
    }
