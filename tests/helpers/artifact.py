"""Writing the 2026-04-27 record's artifacts the record's way, and its reconstruction, independently of pgttt.

Everything here follows spec section 4 (frontier.md) plainly: the quantization kinds of 4.1, the
PGRP container of 4.2 (greedy L1 row order, column-major bytes, ``lrzip -z -L 9``), and the
reconstruction W = q * scale[row] (+ the LQER term), in float32.
"""

from __future__ import annotations

import io
import struct
import subprocess
import tempfile
from pathlib import Path

import brotli
import numpy as np
import torch

GROUPS = [
    "_tok_emb.weight.q",
    "attn.c_k.weight.q",
    "attn.c_q.weight.q",
    "attn.c_v.weight.q",
    "attn.proj.weight.q",
    "mlp.fc.weight.q",
    "mlp.proj.weight.q",
]
SORTED_GROUPS = {"_tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q"}


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    from pgttt.checkpoints.model import GPT

    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in GPT(config).state_dict().items()}


def record_quantize(config, seed: int = 0, *, sym_lqer: str | None = None) -> tuple[dict, dict]:
    """``(w, m)`` with every kind: int7 tok_emb + asymmetric LQER, int6 matrices (blocks.0.mlp.fc with
    asymmetric LQER, ``sym_lqer`` with a symmetric one), int8-per-row attention gates, float16 rest."""
    gen = torch.Generator().manual_seed(seed)
    w, m = {}, {}
    for name, shape in shapes_of(config).items():
        t = torch.randn(shape, generator=gen) * 0.05
        if name.endswith(".attn_gate_w"):
            s = (t.abs().amax(dim=1).clamp_min(1e-10) / 127).to(torch.float16)
            w[name + ".gq"] = torch.clamp(torch.round(t / s.float()[:, None]), -127, 127).to(torch.int8)
            w[name + ".gs"], m[name] = s, "gate_int8_row"
            continue
        if t.ndim < 2 or t.numel() <= 1024:
            w[name], m[name] = t.to(torch.float16), "passthrough (float16)"
            continue
        bits = 7 if name == "tok_emb.weight" else 6
        top = 2 ** (bits - 1) - 1
        s = (3 * t.std(dim=1) / top).clamp_min(1e-10).to(torch.float16)
        q = torch.clamp(torch.round(t / s.float()[:, None]), -top, top).to(torch.int8)
        w[name + ".q"], w[name + ".scale"], m[name] = q, s, f"gptq (int{bits})"
        err = t - q.float() * s.float()[:, None]
        u, sv, vh = torch.linalg.svd(err, full_matrices=False)
        a, b = (u[:, :4] * sv[:4]).contiguous(), vh[:4].contiguous()
        if name in ("tok_emb.weight", "blocks.0.mlp.fc.weight"):
            sa = (a.abs().amax() / 1.5).to(torch.float16)
            bf = b.reshape(-1, 64)
            sb = (bf.abs().amax(dim=1) / 7.5).to(torch.float16)
            w[name + ".lqA_a"] = torch.clamp(torch.round(a / sa.float()), -2, 1).to(torch.int8)
            w[name + ".lqAs_a"] = sa
            qb = torch.clamp(torch.round(bf / sb.float()[:, None]), -8, 7).to(torch.int8)
            w[name + ".lqB_a"] = qb.reshape(b.shape)
            w[name + ".lqBs_a"] = sb
            m[name] += "+lqer_asym"
        elif name == sym_lqer:
            sa = (a.abs().amax(dim=1) / 7).to(torch.float16)
            sb = (b.abs().amax(dim=1) / 7).to(torch.float16)
            w[name + ".lqA"] = torch.clamp(torch.round(a / sa.float()[:, None]), -7, 7).to(torch.int8)
            w[name + ".lqB"] = torch.clamp(torch.round(b / sb.float()[:, None]), -7, 7).to(torch.int8)
            w[name + ".lqAs"], w[name + ".lqBs"] = sa, sb
            m[name] += "+lqer"
    return w, m


def record_reconstruct(w: dict, m: dict) -> dict[str, torch.Tensor]:
    """Spec 4.1's reconstruction, written out: float32, q * scale[row], plus (A sA) @ (B sB)."""
    out = {}
    for name, cat in m.items():
        if cat == "passthrough (float16)":
            out[name] = w[name].float()
            continue
        if cat == "gate_int8_row":
            out[name] = w[name + ".gq"].float() * w[name + ".gs"].float().view(-1, 1)
            continue
        W = w[name + ".q"].float() * w[name + ".scale"].float().view(-1, 1)
        if cat.endswith("+lqer_asym"):
            qb, sb = w[name + ".lqB_a"], w[name + ".lqBs_a"]
            group = qb.numel() // sb.numel()
            A = w[name + ".lqA_a"].float() * float(w[name + ".lqAs_a"])
            B = (qb.reshape(-1, group).float() * sb.float().view(-1, 1)).reshape(qb.shape)
            W = W + A @ B
        elif cat.endswith("+lqer"):
            A = w[name + ".lqA"].float() * w[name + ".lqAs"].float().view(-1, 1)
            B = w[name + ".lqB"].float() * w[name + ".lqBs"].float().view(-1, 1)
            W = W + A @ B
        out[name] = W
    return out


def greedy_l1_order(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    used = np.zeros(n, dtype=bool)
    order, used[0] = [0], True
    current = rows[0].astype(np.float32)
    for _ in range(n - 1):
        free = np.flatnonzero(~used)
        nxt = free[np.argmin(np.abs(rows[free].astype(np.float32) - current).sum(axis=1))]
        order.append(nxt)
        used[nxt] = True
        current = rows[nxt].astype(np.float32)
    return np.array(order, dtype=np.uint16)


def lrzip_compress(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "g.bin"), Path(tmp, "g.lrz")
        src.write_bytes(data)
        subprocess.run(["lrzip", "-q", "-z", "-L", "9", "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def group_blobs(w: dict, num_layers: int) -> tuple[dict[str, bytes], dict, dict, bytes]:
    """Per group its raw (uncompressed) bytes, the remainder, the shape manifest and the permutations."""
    blobs, remainder, manifest, perms = {}, {}, {}, b""
    routed = set()
    for group in GROUPS:
        names = [group[1:]] if group.startswith("_") else [f"blocks.{i}.{group}" for i in range(num_layers)]
        names = [n for n in names if n in w]
        if not names:
            continue
        blob = b""
        for n in names:
            arr = w[n].numpy()
            if group in SORTED_GROUPS:
                order = greedy_l1_order(arr)
                perms += order.tobytes()
                arr = arr[order]
            blob += np.ascontiguousarray(arr.T).tobytes()
            routed.add(n)
        blobs[group] = blob
        manifest[group] = [tuple(w[n].shape) for n in names]
    remainder = {n: t for n, t in w.items() if n not in routed}
    return blobs, remainder, manifest, perms


def pack_streams(streams: list[bytes]) -> bytes:
    return (
        b"PGRP"
        + struct.pack("<I", len(streams))
        + b"".join(struct.pack("<I", len(s)) for s in streams)
        + b"".join(streams)
    )


def remainder_stream(remainder: dict, m: dict, manifest: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({"r": remainder, "m": m, "s": manifest}, buf)
    return brotli.compress(buf.getvalue(), quality=5)


def pack_pergroup(w: dict, m: dict, num_layers: int, compressed: dict[str, bytes] | None = None) -> bytes:
    """The PGRP file; ``compressed`` reuses lrzip streams already made for the same groups."""
    blobs, remainder, manifest, perms = group_blobs(w, num_layers)
    streams = [(compressed or {}).get(g) or (lrzip_compress(blobs[g]) if g in blobs else b"") for g in GROUPS]
    streams += [remainder_stream(remainder, m, manifest), brotli.compress(perms, quality=5) if perms else b""]
    return pack_streams(streams)


def unpack_streams(data: bytes) -> list[bytes]:
    (n,) = struct.unpack_from("<I", data, 4)
    lengths = struct.unpack_from(f"<{n}I", data, 8)
    out, off = [], 8 + 4 * n
    for length in lengths:
        out.append(data[off : off + length])
        off += length
    return out
