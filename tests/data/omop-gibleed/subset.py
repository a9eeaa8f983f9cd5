"""Rebuild this subset of the OHDSI Eunomia GiBleed CDM (see PROVENANCE.md).

    python tests/data/omop-gibleed/subset.py /path/to/gibleed-omop53-csv.tgz

Selection (deterministic, by ascending person_id): the first 25 persons with a gastrointestinal
hemorrhage (concept 192671), 12 with myocardial infarction (4329847), 12 with coronary
arteriosclerosis (317576), 10 with sinusitis or a descendant, and 20 with none of these. Only the
tables and columns the tests read are kept; values are copied verbatim.
"""

import csv
import io
import sys
import tarfile
from pathlib import Path

KEEP = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth",
               "race_concept_id", "ethnicity_concept_id"],
    "observation_period": ["observation_period_id", "person_id", "observation_period_start_date",
                           "observation_period_end_date", "period_type_concept_id"],
    "condition_occurrence": ["condition_occurrence_id", "person_id", "condition_concept_id", "condition_start_date",
                             "condition_end_date"],
    "measurement": ["measurement_id", "person_id", "measurement_concept_id", "measurement_date", "value_as_number",
                    "unit_concept_id"],
    "observation": ["observation_id", "person_id", "observation_concept_id", "observation_date"],
}
SINUSITIS = {"4283893", "257012", "4294548", "40481087"}


def main(tgz: str, out: Path) -> None:
    with tarfile.open(tgz) as tar:
        def rows(table):
            f = tar.extractfile(f"csv/{table}.csv")
            return list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline="")))

        tables = {t: rows(t) for t in list(KEEP) + ["concept", "concept_ancestor"]}
    conds: dict[str, set[str]] = {}
    for r in tables["condition_occurrence"]:
        conds.setdefault(r["person_id"], set()).add(r["condition_concept_id"])
    with_period = {r["person_id"] for r in tables["observation_period"]}
    people = sorted((r["person_id"] for r in tables["person"] if r["person_id"] in with_period), key=int)
    chosen: list[str] = []

    def take(pred, k):
        chosen.extend([p for p in people if p not in chosen and pred(conds.get(p, set()))][:k])

    take(lambda c: "192671" in c, 25)
    take(lambda c: "4329847" in c, 12)
    take(lambda c: "317576" in c, 12)
    take(lambda c: bool(c & SINUSITIS), 10)
    take(lambda c: not c & ({"192671", "4329847", "317576"} | SINUSITIS), 20)
    keep = set(chosen)
    concepts = set()
    for table, cols in KEEP.items():
        subset = [r for r in tables[table] if r["person_id"] in keep]
        for r in subset:
            concepts |= {r[c] for c in cols if c.endswith("concept_id")}
        write(out / f"{table}.csv", cols, subset)
    concept_rows = [r for r in tables["concept"] if r["concept_id"] in concepts]
    write(out / "concept.csv", list(tables["concept"][0]), concept_rows)
    have = {r["concept_id"] for r in concept_rows}
    write(out / "concept_ancestor.csv", list(tables["concept_ancestor"][0]),
          [r for r in tables["concept_ancestor"] if r["ancestor_concept_id"] in have and r["descendant_concept_id"] in have])


def write(path: Path, cols: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        w.writerows([r[c] for c in cols] for r in rows)


if __name__ == "__main__":
    main(sys.argv[1], Path(__file__).parent)
