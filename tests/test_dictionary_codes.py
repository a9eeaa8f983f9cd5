"""Standard vocabularies in the dictionary: the codes table is validated and errors name the variable."""

from __future__ import annotations

import pytest

from ppsehr.common.dictionary import parse_dictionary
from ppsehr.common.errors import DictionaryError


def make(codes, vtype="numeric", **extra):
    spec = {"type": vtype, "codes": codes, **extra}
    if vtype == "numeric":
        spec.setdefault("bins", [0, 1])
    else:
        spec.setdefault("categories", ["absent", "present"])
    return parse_dictionary({"dictionary": {"name": "t", "version": "1"}, "variables": {"v": spec}})


def test_demo_dictionary_carries_verified_codes(dictionary):
    chol = dictionary["chol"]
    assert chol.domain == "measurement" and chol.codes["loinc"] == "2093-3" and chol.codes["omop_concept_id"] == 3027114
    assert dictionary["trestbps"].codes["loinc"] == "8480-6"
    assert dictionary["sex"].category_codes("female") == {"snomed": "248152002", "omop_concept_id": 8532}
    assert dictionary["heart_disease"].category_codes("present")["icd10cm"] == "I25.10"
    assert dictionary["heart_disease"].category_codes("absent") == {}
    assert dictionary["fbs"].domain == "observation" and dictionary["fbs"].codes == {}


def test_valid_codes_are_normalized():
    v = make({"loinc": "2093-3", "omop_concept_id": 3027114, "unit_concept_id": 8840}, unit="mg/dL").variables["v"]
    assert v.codes == {"loinc": "2093-3", "omop_concept_id": 3027114, "unit_concept_id": 8840}
    c = make({"domain": "condition", "categories": {"present": {"snomed": 53741008, "icd10cm": "I25.10"}}},
             "categorical").variables["v"]
    assert c.category_codes("present") == {"snomed": "53741008", "icd10cm": "I25.10"}


@pytest.mark.parametrize("codes, vtype, message", [
    ({"loinc": "2093-4"}, "numeric", r"variables\.v\.codes\.loinc: LOINC '2093-4' has a wrong check digit \(expected 2093-3\)"),
    ({"loinc": "chol"}, "numeric", r"variables\.v\.codes\.loinc: 'chol' is not a LOINC code"),
    ({"snomed": "53741009"}, "numeric", r"variables\.v\.codes\.snomed: .*fails its Verhoeff check digit"),
    ({"snomed": "12"}, "numeric", r"not a SNOMED CT concept id"),
    ({"icd10cm": "I2510"}, "numeric", r"variables\.v\.codes\.icd10cm: 'I2510' is not an ICD-10-CM code"),
    ({"omop_concept_id": 0}, "numeric", r"codes\.omop_concept_id: must be a positive integer"),
    ({"omop_concept_id": "317576"}, "numeric", r"codes\.omop_concept_id: must be a positive integer"),
    ({"rxnorm": "1"}, "numeric", r"variables\.v\.codes: unknown key\(s\) \['rxnorm'\]"),
    ({"domain": "drug"}, "numeric", r"codes\.domain: must be one of"),
    ({"domain": "condition"}, "numeric", r"'condition' needs a categorical variable"),
    ({"domain": "age"}, "numeric", r"'age' needs a numeric variable in years"),
    ({"unit_concept_id": 8840}, "categorical", r"unit_concept_id: only numeric variables have a unit"),
    ({"categories": {"present": {"snomed": "53741008"}}}, "numeric", r"only categorical variables have categories"),
    ({"categories": {"maybe": {"snomed": "53741008"}}}, "categorical",
     r"codes\.categories\.maybe: 'maybe' is not a category of the variable \(categories: \['absent', 'present'\]\)"),
    ({"categories": {"present": {"atc": "C10"}}}, "categorical", r"categories\.present: unknown key\(s\) \['atc'\]"),
    ({"categories": {"present": {}}}, "categorical", r"categories\.present: must be a non-empty table"),
    ("2093-3", "numeric", r"variables\.v\.codes: must be a table"),
])
def test_bad_codes_name_the_variable_and_field(codes, vtype, message):
    with pytest.raises(DictionaryError, match=message):
        make(codes, vtype)


def test_one_age_and_one_gender_variable_at_most():
    raw = {"dictionary": {"name": "t", "version": "1"}, "variables": {
        "a": {"type": "categorical", "categories": ["f", "m"], "codes": {"domain": "gender"}},
        "b": {"type": "categorical", "categories": ["f", "m"], "codes": {"domain": "gender"}}}}
    with pytest.raises(DictionaryError, match=r"'gender' is declared by \['a', 'b'\]"):
        parse_dictionary(raw)
