"""Hessian-aware GPTQ export: activation second moments from forward hooks, then per-row int6/int8.

Each quantized weight ``W`` (rows = outputs) sees inputs ``X``; ``H = X^T X / n`` is collected on
training batches (for the tied embedding, its input is the final-normed hidden state). Scales come
from a row-std clip (``clip = k * std(row)``); columns are then rounded one at a time in order of
decreasing ``diag(H)``, each rounding error spread over the columns not yet rounded (Frantar et al.,
2022), with damping ``damp * mean(diag(H))`` and lazy batch updates of ``block_size`` columns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from pgttt.checkpoints.model import GPT, CastedLinear, autocast
from pgttt.checkpoints.quant import QMAX, QuantizedTensor, Scheme, default_scheme, quantize_rows

TIED_EMBEDDING = "tok_emb.weight"


def _accumulate(hessians: dict[str, Tensor], name: str, x: Tensor) -> None:
    x = x.detach().reshape(-1, x.size(-1)).float()
    if name not in hessians:
        hessians[name] = torch.zeros(x.size(1), x.size(1), dtype=torch.float32, device=x.device)
    hessians[name].addmm_(x.T, x)


def _input_hook(hessians: dict[str, Tensor], name: str):
    def hook(_module, inputs, _output) -> None:
        _accumulate(hessians, name, inputs[0])

    return hook


@torch.no_grad()
def collect_hessians(model: GPT, batches: Iterable[Tensor], precision: str) -> tuple[dict[str, Tensor], int]:
    """Unnormalized ``sum X^T X`` (float32) for every weight GPTQ quantizes, and the number of rows of X."""
    state = model.state_dict()
    wanted = {name for name, t in state.items() if default_scheme(name, t) != "float16"}
    hessians: dict[str, Tensor] = {}
    hooks = []
    for module_name, module in model.named_modules():
        name = f"{module_name}.weight"
        if isinstance(module, CastedLinear) and name in wanted:
            hooks.append(module.register_forward_hook(_input_hook(hessians, name)))
    tied = model.config.tie_embeddings and TIED_EMBEDDING in wanted
    rows = 0
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            with autocast(precision, ids.device):
                hidden = model.forward_hidden(ids)
            if tied:
                _accumulate(hessians, TIED_EMBEDDING, hidden)
            rows += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return hessians, rows


def gptq_quantize(
    weight: Tensor, hessian: Tensor, scheme: Scheme, clip: Tensor, block_size: int = 128, damp: float = 0.01
) -> QuantizedTensor:
    """GPTQ of a (rows, cols) weight against its inputs' ``H`` (cols, cols), on ``hessian``'s device."""
    device = hessian.device
    w = weight.detach().to(device, torch.float32).clone()
    rows, cols = w.shape
    # The scales are round-to-nearest's for the same clip: one formula for both (quant.quantize_rows).
    scale = quantize_rows(w, scheme, clip.to(device)).scale
    sf = scale.float()
    qmax = QMAX[scheme]
    h = hessian.to(device, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    perm = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    # Upper Cholesky factor of H^-1: row j holds the update that column j's error spreads to later ones.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(rows, cols, dtype=torch.int8, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block, hblock = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(block)
        for j in range(i2 - i1):
            col = block[:, j]
            qcol = torch.clamp(torch.round(col / sf), -qmax, qmax)
            q[:, i1 + j] = qcol.to(torch.int8)
            err = (col - qcol * sf) / hblock[j, j]
            errors[:, j] = err
            block[:, j:] -= err[:, None] * hblock[j, j:][None, :]
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return QuantizedTensor(scheme, q.cpu().contiguous(), scale.cpu().contiguous())


def row_clip(weight: Tensor, sigmas: float) -> Tensor:
    """``k * std(row)``: the per-row clip of the records' "SDClip"."""
    return sigmas * weight.detach().float().reshape(weight.size(0), -1).std(dim=1)


def quantize_model(
    state: dict[str, Tensor],
    hessians: dict[str, Tensor],
    *,
    matrix_clip_sigmas: float,
    embed_clip_sigmas: float,
    block_size: int = 128,
    damp: float = 0.01,
) -> dict[str, QuantizedTensor]:
    """Every state-dict entry in the challenge's scheme: GPTQ where a Hessian exists, else rounding."""
    out: dict[str, QuantizedTensor] = {}
    for name, tensor in state.items():
        scheme = default_scheme(name, tensor)
        if scheme == "float16":
            out[name] = quantize_rows(tensor.detach().cpu(), scheme)
            continue
        clip = row_clip(tensor, embed_clip_sigmas if name.startswith("tok_emb") else matrix_clip_sigmas)
        if name in hessians:
            out[name] = gptq_quantize(tensor, hessians[name], scheme, clip, block_size=block_size, damp=damp)
        else:  # an untied embedding: a lookup table, no input statistics
            out[name] = quantize_rows(tensor.detach().cpu(), scheme, clip.cpu())
    return out
