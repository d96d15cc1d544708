"""A slow, plain reading of spec sections 1-4 for the tests, written apart from the engine.

Per-window Python loops, full logits, per-token byte counting, one process. It imports nothing
from ``pgttt.ttt``: the engine's numbers are checked against this, not against themselves.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F


def trim(tokens: list[int], seq_len: int, max_tokens: int | None) -> list[int]:
    usable = ((len(tokens) - 1) // seq_len) * seq_len
    if max_tokens is not None and max_tokens < usable:
        usable = max_tokens
    return tokens[: usable + 1]


def reference_eval(
    model,
    val: list[int],
    base_bytes: list[int],
    has_leading_space: list[bool],
    is_boundary: list[bool],
    *,
    seq_len: int,
    stride: int,
    epochs: int = 0,
    chunk_tokens: int = 32768,
    lr: float = 0.005,
    momentum: float = 0.9,
    batch_seqs: int = 32,
    grad_clip: float = 1.0,
    lr_schedule: str = "cosine",
    optimizer: str = "sgd",
    adapt_include: tuple[str, ...] = (),
    adapt_exclude: tuple[str, ...] = (),
) -> dict:
    """Returns loss_sum, tokens, bytes, val_loss and val_bpb, and per chunk with windows its first scored stream
    position, tokens, bytes and loss sum (``units``); the model ends with the TTT-adapted weights."""
    vocab = model.config.vocab_size
    T = len(val) - 1
    context = seq_len - stride
    window_starts = [ws for ws in range(0, T, stride) if ws + context < T]
    num_chunks = (T + chunk_tokens - 1) // chunk_tokens
    chunk_windows: list[list[int]] = [[] for _ in range(num_chunks)]
    for ws in window_starts:
        scored_start = ws if ws == 0 else ws + context
        chunk_windows[min(scored_start // chunk_tokens, num_chunks - 1)].append(ws)

    params = []
    for name, p in model.named_parameters():
        keep = not adapt_include or any(fnmatch.fnmatchcase(name, pat) for pat in adapt_include)
        keep = keep and not any(fnmatch.fnmatchcase(name, pat) for pat in adapt_exclude)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=False, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)

    loss_sum, tokens, nbytes = 0.0, 0, 0
    units = []
    for c in range(num_chunks):
        windows = chunk_windows[c]
        if not windows:
            continue
        before = (loss_sum, tokens, nbytes)
        with torch.no_grad():
            for i in range(0, len(windows), batch_seqs):
                batch = windows[i : i + batch_seqs]
                x = torch.zeros(len(batch), seq_len, dtype=torch.long)
                y = torch.zeros(len(batch), seq_len, dtype=torch.long)
                for k, ws in enumerate(batch):
                    we = min(ws + seq_len, T)
                    x[k, : we - ws] = torch.tensor(val[ws:we])
                    y[k, : we - ws] = torch.tensor(val[ws + 1 : we + 1])
                logits = model(x).float()
                nll = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="none")
                nll = nll.reshape(len(batch), seq_len)
                for k, ws in enumerate(batch):
                    wlen = min(ws + seq_len, T) - ws
                    first = 0 if ws == 0 else context
                    for pos in range(first, wlen):
                        target, prev = int(y[k, pos]), int(x[k, pos])
                        loss_sum += float(nll[k, pos])
                        tokens += 1
                        nbytes += base_bytes[target]
                        if has_leading_space[target] and not is_boundary[prev]:
                            nbytes += 1
        first = windows[0] if windows[0] == 0 else windows[0] + context
        units.append(
            {
                "first_token": first + 1,
                "tokens": tokens - before[1],
                "bytes": nbytes - before[2],
                "loss_sum": loss_sum - before[0],
            }
        )

        if c == num_chunks - 1 or epochs == 0:
            continue
        if lr_schedule == "cosine":
            chunk_lr = lr * 0.5 * (1 + math.cos(math.pi * c / max(num_chunks - 1, 1)))
        else:
            chunk_lr = lr
        for group in opt.param_groups:
            group["lr"] = chunk_lr
        span_start, span_end = c * chunk_tokens, min((c + 1) * chunk_tokens, T)
        chunk_seqs = (span_end - span_start) // seq_len
        for _ in range(epochs):
            for i in range(0, chunk_seqs, batch_seqs):
                starts = [span_start + (i + k) * seq_len for k in range(min(batch_seqs, chunk_seqs - i))]
                if starts[-1] + seq_len + 1 > len(val):
                    continue
                x = torch.tensor([val[s : s + seq_len] for s in starts])
                y = torch.tensor([val[s + 1 : s + seq_len + 1] for s in starts])
                opt.zero_grad()
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()

    val_loss = loss_sum / tokens
    return {
        "loss_sum": loss_sum,
        "tokens": tokens,
        "bytes": nbytes,
        "val_loss": val_loss,
        "val_bpb": val_loss / math.log(2) * tokens / nbytes if nbytes else None,
        "units": units,
    }
