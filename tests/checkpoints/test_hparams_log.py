"""Reading a record's training log (its Hyperparameters block) for the architecture of a .ptz."""

from __future__ import annotations

import json

import pytest

from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import CheckpointError, read_model_bin
from pgttt.checkpoints.hparams_log import read_training_log
from pgttt.checkpoints.loading import load_checkpoint
from pgttt.main import main
from tests.checkpoints.test_ptz import pack
from tests.helpers.artifact import record_quantize

TINY = PRESETS["tiny-frontier"]


def write_log(path, arch: dict, extra: dict | None = None, params: int | None = None, code: int | None = 31999):
    """A log laid out as the records print it: the block, then the run's lines."""
    values = {**arch, **(extra or {})}
    lines = ["W0426 19:59:28.614000 762659 torch/distributed/run.py:803] *****", "Hyperparameters:"]
    lines += [f"  {k}: {v}" for k, v in sorted(values.items())]
    lines += ["train_shards: 80", "val_tokens: 47851520"]
    if params is not None:
        lines.append(f"model_params:{params}")
    if code is not None:
        lines += ["Code size (uncompressed): 157868 bytes", f"Code size (compressed): {code} bytes"]
    path.write_text("\n".join(lines) + "\n")
    return path


TINY_ARCH = {
    "vocab_size": 1024,
    "num_layers": 4,
    "model_dim": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_mult": 2.0,
    "rope_dims": 8,
    "rope_base": 10000.0,
    "rope_yarn": False,
    "train_seq_len": 128,
    "num_loops": 1,
    "loop_start": 1,
    "loop_end": 2,
    "parallel_start_layer": 2,
    "parallel_final_lane": "mean",
    "xsa_last_n": 4,
    "smear_gate_enabled": True,
    "sparse_attn_gate_enabled": True,
    "sparse_attn_gate_scale": 0.5,
    "gate_window": 6,
    "qk_gain_init": 5.0,
    "tie_embeddings": True,
    "logit_softcap": 30.0,
    "ln_scale": True,
    "skip_gates_enabled": True,
    "attn_out_gate_enabled": False,
    "attn_out_gate_src": "proj",
    "gated_attn_enabled": False,
}
TTT = {
    "ttt_lora_rank": 80,
    "ttt_chunk_size": 48,
    "ttt_lora_lr": 0.0001,
    "ttt_enabled": True,
    "ttt_eval_batches": "",
    "phased_ttt_prefix_docs": 2500,
    "embed_bits": 7,
    "matrix_bits": 6,
    "lqer_enabled": True,
    "lqer_top_k": 2,
    "lqer_rank": 4,
    "gated_attn_quant_gate": True,
    "adam_eps": "1e-08",
}


def test_reader_types_the_architecture_and_keeps_the_rest(tmp_path):
    log = read_training_log(write_log(tmp_path / "train_seed42.log", TINY_ARCH, TTT, params=TINY.num_parameters()))
    assert log.architecture["mlp_mult"] == 2.0 and log.architecture["rope_yarn"] is False
    assert log.architecture["parallel_final_lane"] == "mean" and log.architecture["num_layers"] == 4
    assert log.other["ttt_lora_rank"] == 80 and log.other["ttt_lora_lr"] == 0.0001 and log.other["ttt_enabled"] is True
    assert log.other["ttt_eval_batches"] == "" and log.other["adam_eps"] == 1e-08
    assert log.code_bytes == 31999 and log.model_params == TINY.num_parameters()
    assert set(log.unprinted) == {"family", "parallel_residual_start", "smear_gate_bos_mask"}
    assert log.config("tiny-frontier") == TINY
    assert log.base_preset() == "pr1855"


@pytest.fixture
def artifact(tmp_path):
    w, m = record_quantize(TINY)
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(pack({"w": w, "m": m}))
    return path


def test_import_with_log_then_inspect(tmp_path, artifact, sp1024_tokenizer, capsys):
    log = write_log(tmp_path / "train_seed42.log", TINY_ARCH, TTT, params=TINY.num_parameters())
    out = tmp_path / "model.bin"
    assert (
        main(
            [
                "import",
                str(artifact),
                "--log",
                str(log),
                "--preset",
                "tiny-frontier",
                "--tokenizer",
                str(sp1024_tokenizer),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "with the architecture of train_seed42.log (from preset tiny-frontier" in printed
    assert "1 int7" in printed and "2 with LQER" in printed
    mb = read_model_bin(out)
    assert mb.config == TINY and mb.provenance["training_log"]["settings"]["ttt_lora_rank"] == 80
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["size_check"]["code_bytes"] == 31999
        and "Code size (compressed)" in report["size_check"]["code_bytes_rule"]
    )
    assert [e["name"] for e in report["lqer"]] == ["tok_emb.weight", "blocks.0.mlp.fc.weight"]
    assert report["quantization"]["gate_int8_row"]["tensors"] == 4


def test_set_overrides_the_log(tmp_path, artifact):
    log = write_log(tmp_path / "a.log", {**TINY_ARCH, "mlp_mult": 3.0}, TTT)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(artifact, log=log, preset="tiny-frontier")
    ckpt = load_checkpoint(artifact, log=log, preset="tiny-frontier", overrides=["mlp_mult=2"])
    assert ckpt.config == TINY


WRONG_LOGS = [
    ("no block", lambda p: p.write_text("step 1\nstep 2\n"), "no 'Hyperparameters:' block"),
    ("malformed line", lambda p: p.write_text("Hyperparameters:\n  num_layers 4\n"), ":2: not a 'key: value' line"),
    ("bad value", lambda p: write_log(p, {**TINY_ARCH, "num_layers": "four"}), "num_layers='four' is not a valid int"),
    (
        "another record: parameters",
        lambda p: write_log(p, TINY_ARCH, TTT, params=35945671),
        "the log says model_params:35945671",
    ),
    (
        "another record: layers",
        lambda p: write_log(p, {**TINY_ARCH, "num_layers": 5, "xsa_last_n": 5}, TTT),
        "missing keys: blocks.4.",
    ),
    (
        "another record: embed bits",
        lambda p: write_log(p, TINY_ARCH, {**TTT, "embed_bits": 8}),
        "embed_bits=8 but tok_emb.weight is int7",
    ),
    (
        "another record: LQER count",
        lambda p: write_log(p, TINY_ARCH, {**TTT, "lqer_top_k": 3}),
        "lqer_top_k=3 but 2 tensors carry LQER factors",
    ),
    (
        "another record: gate",
        lambda p: write_log(p, TINY_ARCH, {**TTT, "gated_attn_quant_gate": False}),
        "gated_attn_quant_gate=False but the gates are gate_int8_row",
    ),
    (
        "invalid architecture",
        lambda p: write_log(p, {**TINY_ARCH, "num_heads": 3}, TTT),
        "not a valid architecture: num_heads=3",
    ),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in WRONG_LOGS], ids=[c[0] for c in WRONG_LOGS])
def test_wrong_log_is_refused(tmp_path, artifact, make, fragment):
    log = tmp_path / "train_seed42.log"
    make(log)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(artifact, log=log, preset="tiny-frontier")
    assert fragment in str(info.value) and "\n" not in str(info.value)
