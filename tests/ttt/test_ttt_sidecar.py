"""CaseOps byte sidecars (frontier spec 2.2, 5.3, 5.4): found beside the shards, never read as tokens,
checked shard by shard, cut as the tokens are cut, and the bytes of bits per byte; the LUT otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from pgttt.ttt import EvalConfig, EvalError, EvalSession
from pgttt.ttt.bytes import byte_source, load_byte_tables
from pgttt.ttt.data import DataError, SidecarBytes, ValSet, load_val, resolve_val_files
from tests.conftest import shared_path
from tests.helpers.ttt import MICRO, micro_model, one_thread, random_tables, write_shard  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def caseops_dir(path, shards):
    """``shards``: (tokens, sidecar) per shard, written as fineweb_val_N.bin + fineweb_val_bytes_N.bin."""
    path.mkdir(exist_ok=True)
    for i, (tokens, entries) in enumerate(shards):
        write_shard(path / f"fineweb_val_{i:06d}.bin", tokens)
        if entries is not None:
            write_shard(path / f"fineweb_val_bytes_{i:06d}.bin", entries)
    return path


SHARDS = [([1, 5, 6, 7, 1, 9], [0, 3, 1, 2, 0, 4]), ([1, 8, 8, 1, 2], [0, 2, 2, 0, 5])]


def test_sidecars_are_found_and_never_read_as_tokens(tmp_path):
    folder = caseops_dir(tmp_path, SHARDS)
    assert [f.name for f in resolve_val_files(folder)] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [f.name for f in resolve_val_files(folder / "fineweb_val_*.bin")] == [
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
    ]
    val = load_val(folder, vocab_size=10)
    assert val.tokens.tolist() == [1, 5, 6, 7, 1, 9, 1, 8, 8, 1, 2]
    assert val.sidecar.tolist() == [0, 3, 1, 2, 0, 4, 0, 2, 2, 0, 5]
    assert [f.name for f in val.sidecar_files] == ["fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
    # The sidecars are part of the data's identity: the same tokens without them are another val set.
    plain = load_val(folder / "fineweb_val_00000[01].bin")
    assert plain.sidecar is not None and plain.fingerprint == val.fingerprint  # a glob finds the partners too
    tokens_only = load_val(caseops_dir(tmp_path / "p", [(t, None) for t, _ in SHARDS]))
    assert tokens_only.sidecar is None and tokens_only.fingerprint != val.fingerprint
    with pytest.raises(DataError, match="a byte sidecar, not a token shard"):
        resolve_val_files(folder / "fineweb_val_bytes_000000.bin")


def test_bytes_come_from_the_sidecar_cut_as_the_tokens(tmp_path):
    val = load_val(caseops_dir(tmp_path, SHARDS))
    source = val.byte_source(random_tables(10))
    assert isinstance(source, SidecarBytes) and source.kind == "sidecar"
    tokens = val.trimmed(5)  # 11 tokens: usable 10, so all of them
    assert source.target_bytes(tokens).tolist() == [3, 1, 2, 0, 4, 0, 2, 2, 0, 5]
    tokens = val.trimmed(3, max_tokens=4)  # 5 tokens: targets 1..4
    assert source.target_bytes(tokens).tolist() == [3, 1, 2, 0]
    # Without a sidecar the tokenizer's tables are the source, as before.
    tables = random_tables(10)
    plain = ValSet.from_tokens(val.tokens)
    assert plain.byte_source(tables) is tables
    assert tables.target_bytes(tokens).tolist() != [3, 1, 2, 0]  # (these random tables disagree)


def test_a_sidecar_of_another_length_names_both_files_and_counts(tmp_path):
    folder = caseops_dir(tmp_path, [([1, 5, 6], [0, 1, 1, 7])])
    with pytest.raises(DataError) as err:
        load_val(folder)
    message = str(err.value)
    assert str(folder / "fineweb_val_bytes_000000.bin") in message
    assert "4 entries for the 3 tokens of fineweb_val_000000.bin" in message


def test_a_misaligned_sidecar_names_the_position(tmp_path):
    # Shifted by one: the BOS at position 3 of the second shard gets 2 bytes.
    folder = caseops_dir(tmp_path, [SHARDS[0], ([1, 8, 8, 1, 2], [0, 2, 0, 2, 5])])
    with pytest.raises(DataError) as err:
        load_val(folder)
    message = str(err.value)
    assert str(folder / "fineweb_val_bytes_000001.bin") in message
    assert "entry 2 at position 3, where fineweb_val_000001.bin has BOS" in message and "misaligned" in message


def test_a_missing_or_orphan_sidecar_is_refused(tmp_path):
    folder = caseops_dir(tmp_path / "a", [SHARDS[0], (SHARDS[1][0], None)])
    with pytest.raises(DataError) as err:
        load_val(folder)
    assert str(folder / "fineweb_val_000001.bin") in str(err.value)
    assert "no byte sidecar fineweb_val_bytes_000001.bin" in str(err.value)
    orphan = caseops_dir(tmp_path / "b", [SHARDS[0]])
    write_shard(orphan / "fineweb_val_bytes_000003.bin", [0, 1])
    with pytest.raises(
        DataError, match="fineweb_val_bytes_000003.bin: a byte sidecar without its token shard fineweb_val_000003.bin"
    ):
        load_val(orphan)


def test_a_broken_sidecar_header_names_the_sidecar(tmp_path):
    folder = caseops_dir(tmp_path, [SHARDS[0]])
    write_shard(folder / "fineweb_val_bytes_000000.bin", SHARDS[0][1], magic=7)
    with pytest.raises(DataError, match=r"fineweb_val_bytes_000000\.bin: wrong magic 7"):
        load_val(folder)


def test_in_memory_sidecar_is_checked():
    with pytest.raises(DataError, match="3 sidecar entries for 2 tokens"):
        ValSet.from_tokens([1, 2], sidecar=[0, 1, 1])
    with pytest.raises(DataError, match="sidecar entry 4 at BOS position 2"):
        ValSet.from_tokens([1, 2, 1], sidecar=[0, 1, 4])
    assert ValSet.from_tokens([1, 2], [0, 3]).fingerprint != ValSet.from_tokens([1, 2], [0, 4]).fingerprint


def test_sliding_and_ttt_score_the_same_losses_with_sidecar_bytes():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, MICRO.vocab_size, 161)
    tokens[::23] = 1
    entries = np.where(tokens == 1, 0, rng.integers(0, 6, len(tokens)))
    tables = random_tables(MICRO.vocab_size)
    for ttt_epochs in (0, 1):
        config = EvalConfig(seq_len=16, stride=8, ttt_epochs=ttt_epochs, chunk_tokens=64, batch_seqs=2)
        session = EvalSession(micro_model())
        lut = session.evaluate(ValSet.from_tokens(tokens), tables, config, device="cpu")
        side = session.evaluate(ValSet.from_tokens(tokens, entries), tables, config, device="cpu")
        assert side.loss_sum == lut.loss_sum and side.tokens_scored == lut.tokens_scored == 160
        assert side.bytes_scored == int(entries[1:161].sum()) != lut.bytes_scored
        assert side.identity["bytes_from"] == "sidecar" and lut.identity["bytes_from"] == "tokenizer"
        assert sum(c.scored_bytes for c in side.chunks) == side.bytes_scored


def caseops_tokenizer():
    return shared_path("data", "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")


def test_a_caseops_tokenizer_needs_the_sidecar(sp8192_tokenizer):
    tables = load_byte_tables(caseops_tokenizer(), 8192)
    assert tables.caseops and not load_byte_tables(sp8192_tokenizer, 8192).caseops
    plain = load_val(shared_path("data", "gutenberg_sp8192"))
    with pytest.raises(EvalError) as err:
        byte_source(plain, tables, 8192)
    assert str(plain.files[0]) in str(err.value) and "no byte sidecar" in str(err.value)
    assert "CaseOps tokenizer" in str(err.value)


def test_a_caseops_checkpoint_on_other_data_names_both_tokenizers(sp8192_tokenizer):
    caseops = load_byte_tables(caseops_tokenizer(), 8192)
    plain_tables = load_byte_tables(sp8192_tokenizer, 8192)
    plain = load_val(shared_path("data", "gutenberg_sp8192"))
    with pytest.raises(EvalError) as err:
        byte_source(plain, plain_tables, 8192, caseops.tokenizer_sha256, caseops.tokenizer_name)
    message = str(err.value)
    assert "fineweb_8192_bpe.model" in message and caseops.tokenizer_name in message
    assert caseops.tokenizer_sha256[:12] in message and str(plain.files[0]) in message


def test_the_real_caseops_val_set():
    folder = shared_path("data", "gutenberg_caseops")
    val = load_val(folder, vocab_size=8192)
    assert [f.name for f in val.files] == ["fineweb_val_000000.bin"]
    assert [f.name for f in val.sidecar_files] == ["fineweb_val_bytes_000000.bin"]
    assert len(val.tokens) == 600_936 and int(val.sidecar.sum(dtype=np.int64)) == 1_564_934  # data README
    tables = load_byte_tables(caseops_tokenizer(), 8192)
    source = byte_source(val, tables, 8192)
    tokens = val.trimmed(2048)
    assert len(tokens) == 600_065 and val.target_count(2048) == 600_064
    assert int(source.target_bytes(tokens).sum()) == 1_562_782  # the record's 600,064 targets
    assert int(source.target_bytes(val.trimmed(2048, max_tokens=16_384)).sum()) == 42_012  # eval_val_16k
    # The LUT would charge the case operators 3 bytes each: more than the original text has.
    assert int(tables.target_bytes(tokens).sum()) > 1_562_782
