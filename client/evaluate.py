"""Evaluation plans at the site: a release's synthetic records against this site's rows, as noisy counts.

An evaluation plan (`QueryPlan.evaluation`, docs/evaluation.md) comes with the release's
records.csv (`SignedPlan.records`, public: a DP output) whose SHA-256 the coordinator signed. The
guard checks it like any plan, compiles the OpenDP measurements below, debits their loss with the
plan's marginals (the unmeasured tables, answered as usual) and only then computes:

- **TSTR** (`TstrQuery`): a logistic regression (scikit-learn) trained on the synthetic records to
  predict `target == positive` from every other variable's cells (one-hot), applied to each of the
  site's rows whose target is not missing; the answer is a (negative/positive x score bin) count
  table. Each row falls in one cell and the model is a function of public data only: OpenDP's
  count_by_categories gives the table L2 sensitivity 1.
- **Distance to the closest synthetic record** (`DistanceQuery`): each row's Hamming distance over
  every variable's cell to its nearest synthetic record, a count table over 0..V (a function of
  the row and public data: sensitivity 1 as above), and
- **unique copies**: the number of rows that have an exact synthetic copy (distance 0) and no
  exact duplicate among the site's rows: "the nearest synthetic record is closer than the nearest
  real neighbour" at the one distance where that count has bounded sensitivity. Adding or
  removing one row changes it by at most 1: only the multiplicity m(c) of the row's own cell
  vector c changes, by one, and the count is the number of vectors with m(c) = 1 that have a
  synthetic copy (0 -> 1 adds at most one such vector, 1 -> 2 removes at most one; removal
  mirrors this). It is released with OpenDP's discrete Gaussian on an integer of sensitivity 1.

(At distances above 0 that comparison's count is not a per-row function and adding one patient can
flip arbitrarily many rows' answers, so it is not asked.) Nothing here reads anything but the
encoded table, the public records and the plan; refusals (`EvaluationRefused`) quote only those.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
from ..common import opendp_core as dp

from ..common import accounting
from ..common.dictionary import MISSING, OUT_OF_RANGE, Dictionary, Variable
from ..protos import guard_pb2 as pb

MAX_RECORDS_BYTES = 3 * 1024 * 1024  # records.csv travels with the plan (guards accept 4 MiB messages)
MAX_RECORDS = 100_000
MAX_TSTR = 8
MAX_BINS = 100
DISTANCE_WORK = 20_000_000  # cell comparisons per chunk of the nearest-record search


class EvaluationRefused(Exception):
    """An evaluation plan the guard will not answer (code from common/refusals.py; message from the plan)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class CountQuery:
    """One noisy count table of an evaluation: what is counted, its cells, and its OpenDP measurement."""

    label: tuple[str, ...]  # what the answer's NoisyMarginal.variables say
    shape: tuple[int, ...]
    scale: float
    rho: float  # OpenDP's privacy map at d_in = k, the rows one privacy unit contributes
    measurement: object


@dataclass(frozen=True)
class CompiledEvaluation:
    records: np.ndarray  # (n, V) cells of the synthetic records, dictionary order
    tstr: list[tuple[pb.TstrQuery, CountQuery]]
    distance: CountQuery | None
    unique: CountQuery | None

    @property
    def rho(self) -> float:
        return math.fsum(q.rho for q in self.queries())

    def queries(self) -> list[CountQuery]:
        return [q for _, q in self.tstr] + [q for q in (self.distance, self.unique) if q is not None]


def _histogram(n_cells: int, rho: float, k: int = 1) -> tuple[float, object, float]:
    """count_by_categories over 0..n_cells-1 then discrete Gaussian noise at the smallest scale within rho
    for a unit of k rows (group privacy: calibrated for rho / k^2 per row, charged OpenDP's map at k)."""
    scale = accounting.scale_for_rho(rho / (k * k))
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance()
    meas = space >> dp.t.then_count_by_categories(categories=list(range(n_cells)), null_category=False,
                                                  MO=dp.L2Distance[int]) >> dp.m.then_gaussian(scale=scale)
    return scale, meas, float(meas.map(k))


def _scalar(rho: float, k: int = 1) -> tuple[float, object, float]:
    """Discrete Gaussian noise on one integer of sensitivity 1 per row (the unique-copies count; see the
    module doc), for a unit of k rows as in `_histogram`."""
    scale = accounting.scale_for_rho(rho / (k * k))
    meas = dp.m.make_gaussian(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=scale)
    return scale, meas, float(meas.map(k))


def _check_rho(rho: float, what: str, min_rho: float) -> None:
    if not (isinstance(rho, float) and math.isfinite(rho) and rho >= min_rho):
        raise EvaluationRefused("BAD_RHO", f"{what}: rho must be a finite number of at least {min_rho:g}, got {rho!r}")


def compile_evaluation(plan: pb.QueryPlan, records: bytes, dictionary: Dictionary, policy, min_rho: float,
                       rows_per_unit: int = 1) -> CompiledEvaluation:
    """Check an evaluation plan and the records it names against the dictionary and the site policy, and
    build its OpenDP measurements. Raises EvaluationRefused (before any debit)."""
    ev = plan.evaluation
    if plan.HasField("secure"):
        raise EvaluationRefused("MALFORMED_PLAN", "an evaluation plan is answered per site, not as a secure sum")
    if len(records) > MAX_RECORDS_BYTES:
        raise EvaluationRefused("POLICY_LIMIT", f"the records have {len(records)} bytes; evaluations take at most "
                                f"{MAX_RECORDS_BYTES}")
    if hashlib.sha256(records).digest() != ev.records_sha256:
        raise EvaluationRefused("MALFORMED_PLAN", "the records sent with the plan are not the ones its records_sha256 names")
    if len(ev.tstr) > MAX_TSTR:
        raise EvaluationRefused("POLICY_LIMIT", f"{len(ev.tstr)} TSTR queries; at most {MAX_TSTR}")
    # TSTR and distances read every variable of a row together: only a site releasing every variable
    # jointly answers them (a plan with unmeasured tables only is checked like any plan).
    if ev.tstr or ev.HasField("distance"):
        allowed = None if "*" in policy.allowed_variables else set(policy.allowed_variables)
        for name, var in dictionary.variables.items():
            if (allowed is not None and name not in allowed) or (var.tier == 3 and policy.tier3 != "allow"):
                raise EvaluationRefused("VARIABLE_NOT_ALLOWED", f"TSTR and distance queries read every variable together, "
                                        f"and this site's policy does not release {name!r} that way")
    cells = encode_records(records, dictionary, ev.records)
    tstr = []
    for i, q in enumerate(ev.tstr):
        if q.target not in dictionary.variables or dictionary[q.target].type != "categorical":
            raise EvaluationRefused("UNKNOWN_VARIABLE", f"TSTR query {i}: target {q.target[:64]!r} is not a categorical "
                                    "variable of the dictionary")
        var = dictionary[q.target]
        if q.positive >= var.size or (var.missing and q.positive == var.cell_index(MISSING)):
            raise EvaluationRefused("MALFORMED_PLAN", f"TSTR query {i}: positive cell {q.positive} is not a category of "
                                    f"{q.target!r}")
        if not 2 <= q.bins <= MAX_BINS or q.bins % 2:
            raise EvaluationRefused("MALFORMED_PLAN", f"TSTR query {i}: bins must be even, from 2 to {MAX_BINS}")
        _check_rho(q.rho, f"TSTR query {i}", min_rho)
        scale, meas, rho = _histogram(2 * q.bins, q.rho, rows_per_unit)
        tstr.append((q, CountQuery(("tstr", q.target, dictionary[q.target].cells[q.positive]), (2, q.bins), scale, rho, meas)))
    distance = unique = None
    if ev.HasField("distance"):
        d = ev.distance
        _check_rho(d.rho_histogram, "distance histogram", min_rho)
        _check_rho(d.rho_unique, "unique copies", min_rho)
        scale, meas, rho = _histogram(len(dictionary.names) + 1, d.rho_histogram, rows_per_unit)
        distance = CountQuery(("distance",), (len(dictionary.names) + 1,), scale, rho, meas)
        scale, meas, rho = _scalar(d.rho_unique, rows_per_unit)
        unique = CountQuery(("unique_copied",), (1,), scale, rho, meas)
    if not tstr and distance is None and not plan.marginals:
        raise EvaluationRefused("MALFORMED_PLAN", "the evaluation plan asks for nothing")
    return CompiledEvaluation(cells, tstr, distance, unique)


def cell_of(var: Variable, value: str) -> int | None:
    """Cell of one released value (records.csv vocabulary), or None if it is not in the domain."""
    if value == "":
        return var.cell_index(MISSING) if var.missing else None
    if var.type == "categorical" or value == OUT_OF_RANGE:
        return var.cells.index(value) if value in var.cells and value != MISSING else None
    try:
        x = float(value)
    except ValueError:
        return None
    if not math.isfinite(x):
        return None
    return min(max(int(np.searchsorted(var.bins, x, side="right")) - 1, 0), var.n_bins - 1)


def encode_records(data: bytes, dictionary: Dictionary, expected_rows: int | None = None) -> np.ndarray:
    """(n, V) cells of released records (records.csv: a header naming at least every dictionary variable)."""
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error):
        raise EvaluationRefused("MALFORMED_PLAN", "the records are not UTF-8 CSV") from None
    if not rows:
        raise EvaluationRefused("MALFORMED_PLAN", "the records are empty")
    header, body = rows[0], rows[1:]
    missing = [n for n in dictionary.names if n not in header]
    if missing:
        raise EvaluationRefused("MALFORMED_PLAN", f"the records have no column {missing[0][:64]!r}")
    if expected_rows is not None and len(body) != expected_rows:
        raise EvaluationRefused("MALFORMED_PLAN", f"the records have {len(body)} rows; the plan says {expected_rows}")
    if not 1 <= len(body) <= MAX_RECORDS:
        raise EvaluationRefused("POLICY_LIMIT", f"evaluations take 1 to {MAX_RECORDS} records, got {len(body)}")
    out = np.zeros((len(body), len(dictionary.names)), dtype=np.int64)
    for j, name in enumerate(dictionary.names):
        k, var, cache = header.index(name), dictionary[name], {}
        for i, row in enumerate(body):
            v = row[k] if k < len(row) else None
            if v not in cache:
                cache[v] = None if v is None else cell_of(var, v)
            if cache[v] is None:
                raise EvaluationRefused("MALFORMED_PLAN", f"record {i + 1}: {name!r} is not in the dictionary's domain")
            out[i, j] = cache[v]
    return out


# ----------------------------------------------------------------------------- what is counted
def one_hot(cells: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Rows' cells (n, k) as concatenated one-hot blocks (public domains: the columns never depend on data)."""
    out = np.zeros((len(cells), sum(sizes)), dtype=np.float64)
    offset = 0
    for j, size in enumerate(sizes):
        out[np.arange(len(cells)), offset + cells[:, j]] = 1.0
        offset += size
    return out


def tstr_scores(records: np.ndarray, rows: np.ndarray, dictionary: Dictionary, target: str, positive: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train on the synthetic records, score the real rows: (scores, is_positive, kept) for `rows`
    (rows whose target is missing are not kept). Deterministic: every site trains the same model."""
    from sklearn.linear_model import LogisticRegression

    names = dictionary.names
    t = names.index(target)
    var = dictionary[target]
    absent = var.cell_index(MISSING) if var.missing else -1
    features = [j for j in range(len(names)) if j != t]
    sizes = [dictionary[names[j]].size for j in features]
    train = records[records[:, t] != absent]
    y = (train[:, t] == positive).astype(int)
    kept = rows[:, t] != absent
    x_real = one_hot(rows[kept][:, features], sizes)
    # Data-dependent failures after the debit would say something about the rows: none may happen here.
    if len(x_real) == 0:
        scores = np.zeros(0)
    elif len(train) == 0 or y.min() == y.max():  # one class only: every row gets the synthetic share
        scores = np.full(len(x_real), float(y.mean()) if len(y) else 0.5)
    else:
        model = LogisticRegression(C=1.0, max_iter=2000, solver="lbfgs")
        model.fit(one_hot(train[:, features], sizes), y)
        scores = model.predict_proba(x_real)[:, 1]
    return scores, rows[kept][:, t] == positive, kept


def score_cells(scores: np.ndarray, positive: np.ndarray, bins: int) -> np.ndarray:
    """Cell of each scored row in the (negative/positive x bin) table."""
    b = np.minimum((scores * bins).astype(np.int64), bins - 1)
    return positive.astype(np.int64) * bins + b


def nearest_distances(rows: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Hamming distance (in cells) from every row to its closest record."""
    uniq, inverse = np.unique(records, axis=0, return_inverse=True)
    out = np.empty(len(rows), dtype=np.int64)
    step = max(1, DISTANCE_WORK // max(1, uniq.size))
    for a in range(0, len(rows), step):
        chunk = rows[a:a + step]
        out[a:a + step] = (chunk[:, None, :] != uniq[None, :, :]).sum(axis=2).min(axis=1)
    return out


def unique_copied(rows: np.ndarray, distances: np.ndarray) -> int:
    """Rows with an exact synthetic copy and no exact duplicate among `rows`."""
    if len(rows) == 0:
        return 0
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return int(np.sum((distances == 0) & (counts[inverse.ravel()] == 1)))


def raw_counts(compiled: CompiledEvaluation, rows: np.ndarray, dictionary: Dictionary) -> list[np.ndarray]:
    """The exact counts of every evaluation query (cell indices for the tables, the value for the scalar),
    in `compiled.queries()` order. Only ever passed to their OpenDP measurements (and to tests)."""
    out = []
    for q, _ in compiled.tstr:
        scores, positive, _ = tstr_scores(compiled.records, rows, dictionary, q.target, q.positive)
        out.append(score_cells(scores, positive, q.bins))
    if compiled.distance is not None:
        d = nearest_distances(rows, compiled.records)
        out += [d, np.int64(unique_copied(rows, d))]
    return out


def run_evaluation(compiled: CompiledEvaluation, rows: np.ndarray, dictionary: Dictionary) -> pb.EvaluationAnswer:
    """The paid-for evaluation: every count through its OpenDP measurement (call only after the debit)."""
    answer = pb.EvaluationAnswer()
    for q, raw in zip(compiled.queries(), raw_counts(compiled, rows, dictionary)):
        noisy = q.measurement(int(raw)) if q.label == ("unique_copied",) else q.measurement(np.asarray(raw, dtype=np.int64))
        table = pb.NoisyMarginal(variables=q.label, shape=q.shape, counts=np.atleast_1d(noisy).tolist(), rho=q.rho,
                                 noise_scale=q.scale)
        if q.label[0] == "tstr":
            answer.tstr.append(table)
        elif q.label == ("distance",):
            answer.distance.CopyFrom(table)
        else:
            answer.unique_copied.CopyFrom(table)
    return answer
