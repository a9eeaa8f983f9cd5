"""Records decoding and release bundles: values inside their bins, all-or-nothing writes, verification."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppsehr.common.dictionary import MISSING
from ppsehr.common.errors import ReleaseError
from ppsehr.server.model.records import decode
from ppsehr.server.release.bundle import write_release


def test_numeric_values_are_drawn_inside_their_bin_on_the_precision_grid(dictionary):
    rng = np.random.default_rng(0)
    names = dictionary.names
    n = 5000
    samples = np.stack([rng.integers(0, dictionary[v].size, n) for v in names], axis=1)
    cols = decode(samples, dictionary, rng)
    for j, name in enumerate(names):
        var = dictionary[name]
        for cell, value in zip(samples[:, j], cols[name]):
            label = var.cells[cell]
            if label == MISSING:
                assert value == ""
            elif var.type == "categorical":
                assert value == label
            else:
                x = float(value)
                lo, hi = var.bins[cell], var.bins[cell + 1]
                last = cell == var.n_bins - 1
                assert lo <= x and (x <= hi if last else x < hi), (name, label, value)
                assert value == f"{x:.{var.precision}f}"
    # oldpeak's [0, 0.1) bin at precision 1 can only be 0.0
    op = dictionary["oldpeak"]
    zero_bin = op.cells.index("[0,0.1)")
    assert {v for c, v in zip(samples[:, names.index("oldpeak")], cols["oldpeak"]) if c == zero_bin} == {"0.0"}


def _sign(data: bytes) -> bytes:
    return b"sig"


def test_release_is_written_whole(tmp_path):
    out = write_release(tmp_path / "rel", {"records.csv": b"a,b\n1,2\n", "sub/x.json": b"{}"}, {"release_id": "r1"}, _sign)
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["files"]) == {"records.csv", "sub/x.json"} and (out / "manifest.sig").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rel"]  # no temporary leftovers


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ReleaseError, match="bad release file name"):
        write_release(tmp_path / "rel", {"records.csv": b"x", "../escape.csv": b"y"}, {}, _sign)
    assert list(tmp_path.iterdir()) == []

    def broken_signer(data):
        raise RuntimeError("signing device unplugged")

    with pytest.raises(RuntimeError):
        write_release(tmp_path / "rel", {"records.csv": b"x"}, {}, broken_signer)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "keep.txt").write_text("mine")
    with pytest.raises(ReleaseError, match="already exists"):
        write_release(tmp_path / "rel", {"records.csv": b"x"}, {}, _sign)
    assert (tmp_path / "rel" / "keep.txt").read_text() == "mine"
