"""Token shards: every rejection of spec section 1, name-ordered concatenation, trimming, fingerprints."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pgttt.errors import PgtttError
from pgttt.ttt.data import DataError, ValSet, load_val, open_shard, read_header, resolve_val_files, trim_stream
from tests.helpers.ttt import write_shard


def test_valid_shard_is_memory_mapped(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 7, 65535])
    assert read_header(path) == 4
    tokens = open_shard(path)
    assert isinstance(tokens, np.memmap)
    assert tokens.tolist() == [1, 5, 7, 65535]


@pytest.mark.parametrize(
    ("kwargs", "tokens", "message"),
    [
        ({"magic": 20240521}, [1, 2], "wrong magic 20240521"),
        ({"version": 2}, [1, 2], "unsupported shard version 2"),
        ({"count": 3}, [1, 2], "short read: the header promises 3 tokens (1030 bytes), the file has 1028 bytes"),
        ({"count": 1}, [1, 2], "size mismatch: the header says 1 tokens, so 1026 bytes, but the file has 1028"),
        ({"count": -1}, [1, 2], "negative token count -1"),
    ],
)
def test_each_header_fault_has_its_own_message(tmp_path, kwargs, tokens, message):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", tokens, **kwargs)
    with pytest.raises(DataError) as err:
        open_shard(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert isinstance(err.value, PgtttError)


def test_truncated_header_is_a_short_read(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"short read: the header needs 1024 bytes, the file has 100"):
        open_shard(path)


def test_odd_trailing_byte_is_a_size_mismatch(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="size mismatch"):
        open_shard(path)


def test_token_beyond_vocab_names_first_position_and_value(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 1024, 9, 2000])
    assert open_shard(path, vocab_size=2001).tolist() == [1, 2, 1024, 9, 2000]
    with pytest.raises(DataError) as err:
        open_shard(path, vocab_size=1024)
    assert f"{path}: token id 1024 at position 2 is not below the model's vocab_size=1024" in str(err.value)


def test_cached_validation_sees_a_rewritten_file(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    open_shard(path, vocab_size=10)
    write_shard(path, [1, 2, 3, 50])
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    with pytest.raises(DataError, match="token id 50 at position 3"):
        open_shard(path, vocab_size=10)


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_val_files(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no fineweb_val_\*\.bin files in this directory"):
        resolve_val_files(tmp_path)
    with pytest.raises(DataError, match="no files match this pattern"):
        resolve_val_files(tmp_path / "x_*.bin")


def test_val_dir_concatenates_in_name_order(tmp_path):
    # Written out of order; a train shard in the same directory is not part of val.
    write_shard(tmp_path / "fineweb_val_000002.bin", [30, 31])
    write_shard(tmp_path / "fineweb_val_000000.bin", [10, 11, 12])
    write_shard(tmp_path / "fineweb_val_000001.bin", [20])
    write_shard(tmp_path / "fineweb_train_000000.bin", [99])
    val = load_val(tmp_path, vocab_size=100)
    assert [f.name for f in val.files] == [f"fineweb_val_00000{i}.bin" for i in range(3)]
    assert val.tokens.tolist() == [10, 11, 12, 20, 30, 31]
    # A glob and a single file work too.
    assert load_val(tmp_path / "fineweb_val_00000[01].bin").tokens.tolist() == [10, 11, 12, 20]
    assert load_val(tmp_path / "fineweb_train_000000.bin").tokens.tolist() == [99]


def test_bad_id_in_a_later_shard_names_that_shard(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    bad = write_shard(tmp_path / "fineweb_val_000001.bin", [3, 77])
    with pytest.raises(DataError, match=rf"{bad}: token id 77 at position 1"):
        load_val(tmp_path, vocab_size=50)
    val = load_val(tmp_path)
    with pytest.raises(DataError, match="token id 77"):
        val.check_vocab(50)


def test_fingerprint_changes_with_content_and_name(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_shard(a / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(b / "fineweb_val_000000.bin", [1, 2, 3])
    first = load_val(a).fingerprint
    assert len(first) == 64
    assert load_val(b).fingerprint == first  # same names and bytes, another directory
    write_shard(b / "fineweb_val_000000.bin", [1, 2, 4])
    os.utime(b / "fineweb_val_000000.bin", ns=(1, 1))
    assert load_val(b).fingerprint != first
    (a / "fineweb_val_000000.bin").rename(a / "fineweb_val_000007.bin")
    assert load_val(a).fingerprint != first


def test_trim_to_whole_sequences_plus_one():
    tokens = np.arange(23, dtype=np.uint16)
    # usable = ((23 - 1) // 5) * 5 = 20 targets, so 21 tokens.
    assert trim_stream(tokens, 5).tolist() == list(range(21))
    assert trim_stream(tokens, 5, max_tokens=7).tolist() == list(range(8))
    assert len(trim_stream(tokens, 5, max_tokens=1000)) == 21
    assert len(trim_stream(tokens, 22)) == 23
    with pytest.raises(DataError, match="23 tokens is too few for seq_len=23"):
        trim_stream(tokens, 23)


def test_in_memory_val():
    val = ValSet.from_tokens(np.array([1, 2, 99, 100]))
    assert val.tokens.dtype == np.uint16 and val.files == ()
    assert val.fingerprint == ValSet.from_tokens([1, 2, 99, 100]).fingerprint != ValSet.from_tokens([1, 2]).fingerprint
    val.check_vocab(101)
    with pytest.raises(DataError, match="in-memory val: token id 99 at position 2 is not below"):
        val.check_vocab(99)
    with pytest.raises(DataError, match="in-memory val: 4 tokens is too few for seq_len=8"):
        val.trimmed(8)
