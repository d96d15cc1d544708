"""Per-unit sums (pgttt.api.units): a round trip through the file format, and hostile files refused."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from pgttt.api.units import UnitsError, UnitSums


def sample(n: int = 5) -> UnitSums:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 100, n)
    return UnitSums("document", np.cumsum(tokens) - tokens, tokens, tokens * 3, rng.random(n) * tokens)


def test_round_trip_keeps_every_value_and_the_identity(tmp_path):
    u = sample()
    u.save(tmp_path / "r.units.npz")
    v = UnitSums.load(tmp_path / "r.units.npz")
    for name in ("first_token", "tokens", "bytes", "loss_sum"):
        assert np.array_equal(getattr(u, name), getattr(v, name))
    assert v.identity() == u.identity() and v.total == u.total and len(v) == 5


def test_identity_ignores_losses_but_not_which_units():
    u = sample()
    same_units = UnitSums(u.kind, u.first_token, u.tokens, u.bytes, u.loss_sum + 1)
    assert same_units.identity() == u.identity()
    assert UnitSums("chunk", u.first_token, u.tokens, u.bytes, u.loss_sum).identity() != u.identity()
    assert UnitSums(u.kind, u.first_token + 1, u.tokens, u.bytes, u.loss_sum).identity() != u.identity()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(kind="page"), "kind"),
        (dict(tokens=np.ones(4, dtype=np.int64)), "4 entries"),
        (dict(loss_sum=np.full(5, np.nan)), "not finite"),
        (dict(bytes=-np.ones(5, dtype=np.int64)), "negative"),
        (dict(first_token=np.zeros((5, 1), dtype=np.int64)), "one dimension"),
    ],
)
def test_inconsistent_arrays_are_refused(bad, match):
    u = sample()
    fields = dict(kind=u.kind, first_token=u.first_token, tokens=u.tokens, bytes=u.bytes, loss_sum=u.loss_sum)
    with pytest.raises(UnitsError, match=match):
        UnitSums(**{**fields, **bad})


def _npz(**members: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def test_hostile_files_are_refused_with_their_name():
    u = sample()
    good = dict(
        kind=np.array("document"), first_token=u.first_token, tokens=u.tokens, bytes=u.bytes, loss_sum=u.loss_sum
    )
    with pytest.raises(UnitsError, match="x.npz: not a units file"):
        UnitSums.from_bytes(b"not a zip", name="x.npz")
    with pytest.raises(UnitsError, match="members"):
        UnitSums.from_bytes(_npz(**good, extra=np.zeros(1)))
    with pytest.raises(UnitsError, match="unreadable"):  # an object array would need a pickle
        UnitSums.from_bytes(_npz(**{**good, "tokens": np.array([{"a": 1}] * 5, dtype=object)}))
    with pytest.raises(UnitsError, match="float32"):
        UnitSums.from_bytes(_npz(**{**good, "loss_sum": u.loss_sum.astype(np.float32)}))


def test_a_file_declaring_more_than_the_bound_is_refused_before_it_is_read(monkeypatch):
    from pgttt.api import units

    data = sample(1000).to_bytes()
    monkeypatch.setattr(units, "MAX_UNITS", 10)
    with pytest.raises(UnitsError, match="declares"):
        UnitSums.from_bytes(data)


def test_the_units_module_never_imports_torch():
    code = "import sys, pgttt.api.units; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
