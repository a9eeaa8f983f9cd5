"""The privacy unit: what one site's guard protects, as its signed receipts state it.

A site's records come from its mapping's source (common/mapping.py). The guard states the unit
in every receipt (`unit`, `rows_per_patient`) and charges each plan for the loss of one unit:

- `patient`: one record per patient. Rows are grouped by the source's patient-key column and each
  patient's rows are reduced to one record by the rules the mapping declares.
- `patient_rows`: up to k = rows_per_patient records per patient (rows beyond k are dropped).
  Adding or removing a patient changes up to k records, so the guard charges group privacy: a
  measurement whose per-record zCDP loss is r costs the patient k^2 r (OpenDP's privacy map at
  d_in = k), and it calibrates the noise so that this patient-level loss is the plan's rho.
- `patient_attested_row`: one record per table row, which the site admin attests is one patient
  each (`patient_key = "row"`: the source has no patient id, so the guard cannot check it).

A receipt without a unit (an older guard) is a row-level statement: a patient with several rows
in that site's table is not covered by the stated rho. `statement` turns the per-site units of a
release into the sentence its manifest and report carry; `release verify` recomputes it.
"""

from __future__ import annotations

PATIENT = "patient"
PATIENT_ROWS = "patient_rows"
ATTESTED_ROW = "patient_attested_row"
LEGACY = ""  # a receipt that states no unit
UNITS = (PATIENT, PATIENT_ROWS, ATTESTED_ROW)


def describe(unit: str, k: int = 1) -> str:
    """One site's unit in words."""
    if unit == PATIENT:
        return "one patient, with all of their rows reduced to one record by the site's declared rules"
    if unit == PATIENT_ROWS:
        return (f"one patient, with up to {k} records (rows beyond {k} dropped); group privacy charged: "
                f"the patient's loss is {k}^2 = {k * k} times one record's")
    if unit == ATTESTED_ROW:
        return "one patient, as one table row (the site admin attests each row is a distinct patient; no patient id)"
    return "one table row (the site's guard states no patient unit: a patient with several rows may lose more)"


def weakest(units: list[tuple[str, int]]) -> tuple[str, int]:
    """The unit a site's receipts in one release support together (a site may restart with another mapping)."""
    found = set(units)
    if not found:
        return LEGACY, 1
    if len(found) == 1:
        return next(iter(found))
    for unit in (LEGACY, ATTESTED_ROW):
        if any(u == unit for u, _ in found):
            return unit, 1
    return PATIENT_ROWS, max(max(k for _, k in found), 1)


def statement(site_units: dict[str, tuple[str, int]]) -> str:
    """The release's privacy unit, from each site's (unit, rows_per_patient) as its receipts state them."""
    base = "one patient at one site, added or removed with all of their records"
    if site_units and all(u == PATIENT for u, _ in site_units.values()):
        return base + " (each site reduces a patient's rows to one record by its declared rules)"
    if site_units and all(u == LEGACY for u, _ in site_units.values()):
        return "one table row at one site, added or removed (no site's guard states a patient unit)"
    parts = []
    for site in sorted(site_units):
        unit, k = site_units[site]
        if unit == PATIENT_ROWS:
            parts.append(f"{site}: up to {k} records per patient, charged {k * k}x by group privacy")
        elif unit == ATTESTED_ROW:
            parts.append(f"{site}: one row per patient as attested by the site admin (no patient id)")
        elif unit == LEGACY:
            parts.append(f"{site}: one table row (no patient unit stated: a patient with several rows may lose more)")
    head = base if not any(u == LEGACY for u, _ in site_units.values()) else \
        "one patient at one site, added or removed, except where a site states only a row unit"
    return head + "; " + "; ".join(parts) if parts else head
