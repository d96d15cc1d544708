"""Paired comparisons (pgttt.api.compare) on synthetic units whose truth is known: Δ from the totals, an interval
that covers the full-set Δ as often as it says, zero for a result against itself, refusals naming the field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pgttt.api.compare import CompareError, Comparison, Side, compare, load_side, units_path
from pgttt.api.units import UnitSums

SHA, FP, TOK = "a" * 64, "f" * 64, "t" * 64


def units(n: int = 300, seed: int = 0) -> UnitSums:
    """Documents of varied length and loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 400, n)
    loss = tokens * (2.0 + 0.3 * rng.standard_normal(n))
    return UnitSums("document", np.cumsum(tokens) - tokens, tokens, tokens * 4, loss)


def side(label: str, u: UnitSums, **overrides) -> Side:
    fields = dict(
        checkpoint="demo", checkpoint_sha256=SHA, val_fingerprint=FP, tokenizer_sha256=TOK, config={"ttt_lr": 0.005}
    )
    return Side(label, u, **{**fields, **overrides})


def with_loss(u: UnitSums, loss: np.ndarray) -> UnitSums:
    return UnitSums(u.kind, u.first_token, u.tokens, u.bytes, loss)


def test_a_result_against_itself_is_zero_exactly_with_zero_width():
    u = units()
    c = compare(side("A", u), side("B", u))
    assert c.delta_bpb == 0.0 and c.low == 0.0 and c.high == 0.0
    assert c.improved == 0.0 and c.worsened == 0.0 and c.differs == {}
    assert "no clear difference" in c.verdict


def test_delta_is_from_the_totals_and_the_contributors_sum_to_it():
    a, rng = units(), np.random.default_rng(5)
    b = with_loss(a, a.loss_sum + rng.normal(0, 5, len(a)))
    c = compare(side("A", a), side("B", b, config={"ttt_lr": 0.01}), top=len(a))
    nbytes = a.bytes.sum()
    assert c.delta_bpb == pytest.approx((b.loss_sum.sum() - a.loss_sum.sum()) / math.log(2) / nbytes, rel=1e-12)
    assert c.bpb_a == pytest.approx(a.loss_sum.sum() / math.log(2) / nbytes, rel=1e-12)
    assert sum(x.delta_bpb for x in c.contributors) == pytest.approx(c.delta_bpb, rel=1e-9)
    assert abs(c.contributors[0].delta_bpb) == max(abs(x.delta_bpb) for x in c.contributors)
    d = b.loss_sum - a.loss_sum
    assert c.improved == np.mean(d < 0) and c.worsened == np.mean(d > 0)
    assert c.differs == {"ttt_lr": [0.005, 0.01]}
    assert c.low < c.delta_bpb < c.high
    assert Comparison.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_the_interval_covers_the_full_set_delta_as_often_as_it_claims():
    # A population of documents with a known full-set Δ; each trial scores a random subset of them and bootstraps.
    rng = np.random.default_rng(1)
    pop = 20_000
    tokens = rng.integers(20, 400, pop)
    loss_a = tokens * (2.0 + 0.3 * rng.standard_normal(pop))
    loss_b = loss_a + tokens * (-0.01 + 0.05 * rng.standard_normal(pop))  # B helps a little, unevenly
    true_delta = (loss_b.sum() - loss_a.sum()) / math.log(2) / (4 * tokens.sum())
    covered, trials = 0, 100
    for trial in range(trials):
        pick = np.sort(rng.choice(pop, 400, replace=False))
        t = tokens[pick]
        ua = UnitSums("document", np.cumsum(t) - t, t, 4 * t, loss_a[pick])
        c = compare(side("A", ua), side("B", with_loss(ua, loss_b[pick])), resamples=1000, seed=trial)
        covered += c.low <= true_delta <= c.high
    assert 0.88 <= covered / trials <= 1.0  # 95 % nominal; 100 trials


def test_a_clearly_worse_setting_has_an_interval_above_zero_and_the_seed_fixes_it():
    a, rng = units(), np.random.default_rng(2)
    b = with_loss(a, a.loss_sum + a.tokens * (0.05 + 0.03 * rng.standard_normal(len(a))))
    c = compare(side("A", a), side("B", b))
    assert c.low > 0 and "B is worse" in c.verdict and c.worsened > 0.9
    assert compare(side("A", a), side("B", b)) == c
    assert compare(side("A", a), side("B", b), seed=1).low != c.low


@pytest.mark.parametrize(
    "change, field, match",
    [
        (dict(checkpoint_sha256="b" * 64), "checkpoint", "sha256 aaaaaaaaaaaa, B is sha256 bbbbbbbbbbbb"),
        (dict(checkpoint_sha256=None, checkpoint="other"), "checkpoint", "'demo', B is 'other'"),
        (dict(val_fingerprint="e" * 64), "dataset", "val_fingerprint"),
        (dict(tokenizer_sha256="s" * 64), "dataset", "tokenizer_sha256"),
        (dict(u=units(n=299)), "units", "A has 300 documents, B has 299"),
        (dict(u=units(seed=3)), "units", "document 1 has first_token 343 in A, 328 in B"),
        (dict(val_bpb=9.0), "units", "the result says 9.00000000"),
    ],
)
def test_what_cannot_be_paired_is_refused_naming_the_field(change, field, match):
    a = side("A", units())
    with pytest.raises(CompareError, match=match) as info:
        compare(a, side("B", **{"u": a.units, **change}))
    assert info.value.field == field


def test_different_kinds_and_bad_parameters_are_refused():
    u = units()
    chunks = UnitSums("chunk", u.first_token, u.tokens, u.bytes, u.loss_sum)
    with pytest.raises(CompareError, match="A scored documents, B scored chunks") as info:
        compare(side("A", u), side("B", chunks))
    assert info.value.field == "units.kind"
    for kw, field in ((dict(resamples=0), "resamples"), (dict(confidence=1.0), "confidence"), (dict(top=-1), "top")):
        with pytest.raises(CompareError) as info:
            compare(side("A", u), side("B", u), **kw)
        assert info.value.field == field


def test_result_files_name_their_units_file_beside_them(tmp_path):
    u = units()
    out = tmp_path / "run.json"
    assert units_path(out) == tmp_path / "run.units.npz"
    u.save(units_path(out))
    result = {
        "val_bpb": u.total[0] / math.log(2) / u.total[2],
        "config": {"ttt_lr": 0.005},
        "identity": {"checkpoint_sha256": SHA, "val_fingerprint": FP, "tokenizer_sha256": TOK},
        "units": {"file": "run.units.npz"},
    }
    out.write_text(json.dumps(result))
    loaded = load_side(out)
    assert loaded.label == str(out) and loaded.checkpoint_sha256 == SHA and loaded.units.identity() == u.identity()

    (tmp_path / "escape.json").write_text(json.dumps({**result, "units": {"file": "../run.units.npz"}}))
    with pytest.raises(CompareError, match="not a file name beside it"):
        load_side(tmp_path / "escape.json")
    (tmp_path / "run.units.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CompareError, match="not a units file") as info:
        load_side(out)
    assert info.value.field == "units"
    (tmp_path / "bare.json").write_text(json.dumps({"val_bpb": 1.0}))
    with pytest.raises(CompareError, match="names no units file"):
        load_side(tmp_path / "bare.json")
