"""The PII guard: precision/recall on the labelled sentences, placeholders, sensitivity tiers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppsehr.common.errors import DictionaryError
from ppsehr.server.llm.pii import PIIGuard, evaluate, load_examples, text_max_tier

DATA = Path(__file__).parent / "data" / "pii_sentences.jsonl"


def test_labelled_set_is_well_formed():
    rows = load_examples(DATA)
    assert {r["split"] for r in rows} == {"dev", "test", "holdout"}
    assert len(rows) == 220 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        for e in r["entities"]:
            assert e["text"] in r["text"] and e["label"] in ("NAME", "ADDRESS", "PHONE", "EMAIL", "ID", "HOSPITAL", "STD", "PREGNANCY")
    assert sum(not r["entities"] for r in rows) >= 50  # negatives, most of them hard
    assert sum(r["note"].startswith("hard") for r in rows) >= 40


@pytest.mark.parametrize("split, precision, recall", [("dev", 0.97, 0.97), ("test", 0.97, 0.97), ("holdout", 0.95, 0.9)])
def test_precision_and_recall(split, precision, recall):
    """Floors a little under the measured figures (docs/llm.md): a regression fails here."""
    scores = evaluate(load_examples(DATA, split))
    overall = scores["ALL"]
    assert overall.precision >= precision, scores["ALL"].errors
    assert overall.recall >= recall, scores["ALL"].errors
    assert scores["ANY_IDENTIFIER"].precision >= precision


def test_identifiers_become_synthetic_placeholders_and_are_counted():
    guard = PIIGuard()
    text = ("Mr. John Carter (SSN 123-45-6789) lives at 14 Elm Grove, Leeds LS6 2AA; call +44 20 7946 0958 or "
            "email j.carter@example.org. Referred by St. Mary's Hospital.")
    clean, findings = guard.scrub(text)
    assert clean == ("Mr. [NAME] (SSN [ID]) lives at [ADDRESS]; call [PHONE] or email [EMAIL]. Referred by [HOSPITAL].")
    assert [f.label for f in findings] == ["NAME", "ID", "ADDRESS", "PHONE", "EMAIL", "HOSPITAL"]
    assert guard.report()["identifiers_replaced"] == {"EMAIL": 1, "ID": 1, "PHONE": 1, "ADDRESS": 1, "HOSPITAL": 1, "NAME": 1}
    assert guard.scrub(clean)[0] == clean  # placeholders are never detected again


def test_sensitive_content_follows_the_tier_policy():
    text = "Treated for chlamydia; pregnancy test negative."
    strict = PIIGuard(text_max_tier=2)
    assert strict.scrub(text)[0] == "Treated for [SENSITIVE:STD]; [SENSITIVE:PREGNANCY] test negative."
    assert strict.report()["sensitive_redacted"] == {"STD": 1, "PREGNANCY": 1}
    lenient = PIIGuard(text_max_tier=3)
    assert lenient.scrub(text)[0] == text
    assert lenient.report()["sensitive_found"] == {"STD": 1, "PREGNANCY": 1} and lenient.report()["sensitive_redacted"] == {}
    # knowledge about variables is not about a patient: counted, kept
    assert strict.scrub("pregnancy with male sex is impossible", about_patient=False)[0].startswith("pregnancy")
    assert text_max_tier({}) == 2 and text_max_tier({"llm": {"text_max_tier": 3}}) == 3
    with pytest.raises(DictionaryError, match="text_max_tier"):
        text_max_tier({"llm": {"text_max_tier": 7}})


@pytest.mark.parametrize("text", [
    "A 54-year-old male presented with typical angina; resting ECG showed ST-T wave abnormality, cholesterol 245 mg/dL.",
    "Maximum heart rate 150/min during the Bruce protocol; ST depression 2.3 mm with a downsloping segment.",
    "Ein 54-jähriger Mann mit typischer Angina Pectoris. Ruhe-EKG: ST-T-Veränderungen. Blutdruck 140 mmHg.",
    "Patiente de 61 ans, douleur thoracique atypique. Fréquence cardiaque maximale 162/min, thal normal.",
    "Paciente varón de 58 años con angina típica. Colesterol 230 mg/dL, 2 vasos en la fluoroscopia.",
    "Exercise-induced angina: yes. Number of vessels coloured by fluoroscopy: 3. Oldpeak 1.4.",
])
def test_clinical_notes_are_left_alone(text):
    guard = PIIGuard(vocabulary=["Chest pain type", "Resting ECG"])
    assert guard.find(text) == []


def test_extra_terms_from_the_consortium():
    guard = PIIGuard(hospitals=["Hungarian Institute"], names=["Aha"])
    assert guard.scrub("Data from the Hungarian Institute, thanks to Aha.")[0] == "Data from the [HOSPITAL], thanks to [NAME]."
