"""A slow, plain reading of spec section 2 (phased per-document LoRA TTT) for the tests, written apart from the engine.

One document at a time, one chunk at a time: every chunk of every document goes through the model alone, in
its own window, with that document's own LoRA and its own optimizer; Python lists and float sums. It imports
nothing from ``pgttt.ttt``: the engine (``ttt/phased.py``) is checked against this, not against itself.

Where spec section 2 leaves a detail to the record's code, the record's code decides (``L1234`` = line of the
2026-04-27 record's ``train_gpt.py``, as in the spec):
* ``PHASED_TTT_NUM_PHASES`` below 1 counts as 1, and ``PHASED_TTT_PREFIX_DOCS=0`` means no phases (L3029-L3039);
* the global-SGD warm-up ramps over chunks ``0 .. w-1`` as ``start + (lr - start) * c / max(w - 1, 1)`` and the
  cosine then runs over the chunks after it (L2953-L2968);
* with ``TTT_WARM_START_A=0`` every reset of the 64-slot set draws new A matrices, in the order they were built;
* global SGD cuts its chunk into sequences of ``seq_len`` tokens (the record's ``EVAL_SEQ_LEN``, not
  ``TTT_EVAL_SEQ_LEN``), and each document piece of a packed row is at most that long (L2969, L2990).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

BOS = 1
# The order the record builds an adapter set in, hence the order its A matrices are drawn (compat README).
SITES = ("q", "v", "k", "mlp", "o")


# ---- the model's interface ---------------------------------------------------------------------------
def layer_applications(model) -> int:
    """How many layer applications (LoRA slots) one forward makes: 17 for the records (spec 3.7)."""
    encoder, decoder = model.schedule()
    return len(encoder) + len(decoder)


def window_logits(model, ids: list[int], adapters) -> torch.Tensor:
    """Logits (len(ids), vocab) of one window through the model with one document's adapters (dense causal)."""
    return model(torch.tensor([ids]), adapters=adapters)[0]


def packed_logits(model, ids: list[int], boundaries: list[int] | None) -> torch.Tensor:
    """Logits of one packed row; with ``boundaries`` (segment starts and the row length) attention stays inside
    each segment (spec 3.10)."""
    if boundaries is None:
        return model(torch.tensor([ids]))[0]
    return model(torch.tensor([ids]), cu_seqlens=torch.tensor(boundaries, dtype=torch.int64))[0]


# ---- 2.2 documents and their selection -----------------------------------------------------------------
def find_documents(tokens: list[int]) -> list[tuple[int, int]]:
    """(start, length) of every document: from one BOS up to and including the next BOS (the last: to the end)."""
    starts = [i for i, t in enumerate(tokens) if t == BOS]
    documents = []
    for k, start in enumerate(starts):
        end = starts[k + 1] + 1 if k + 1 < len(starts) else len(tokens)
        if end - start < 2:
            raise ValueError(f"the document at {start} has {end - start} token(s); every document needs 2")
        documents.append((start, end - start))
    return documents


def select_documents(
    documents: list[tuple[int, int]], fraction: float, seed: int, max_docs: int | None
) -> list[tuple[int, int]]:
    """pgttt's ``max_docs`` keeps the stream's first documents; then the record's seeded subset (L2915-L2923)."""
    if max_docs is not None:
        documents = documents[:max_docs]
    if fraction < 1.0:
        count = max(1, int(round(len(documents) * fraction)))
        documents = [documents[i] for i in sorted(random.Random(seed).sample(range(len(documents)), count))]
    return documents


# ---- 2.3 batches and their queue --------------------------------------------------------------------------
def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Document indices sorted by length (stable), cut into batches G_0, G_1, ... in that ascending order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def queue_order(batches: list[list[int]], lengths: list[int]) -> list[int]:
    """Batch numbers by descending longest document; equal maxima keep ascending batch numbers."""
    return sorted(range(len(batches)), key=lambda g: -max(lengths[i] for i in batches[g]))


# ---- 2.8 and 2.11 the phase schedule --------------------------------------------------------------------
def phase_boundaries(prefix_docs: int, num_docs: int, num_phases: int) -> list[int]:
    """b_p = floor(D p / P) for p = 1 .. P, D clipped to the number of documents; none when D is 0."""
    docs = max(0, min(num_docs, prefix_docs))
    if docs == 0:
        return []
    phases = max(1, num_phases)
    return [docs * p // phases for p in range(1, phases + 1)]


def pause_points(sizes: list[int], boundaries: list[int], ranks: int) -> list[int]:
    """K_p, the number of queue batches completed at each pause, by spec 2.11's canonical rule.

    ``sizes`` are the batch sizes in queue order. After the previous pause (or the start), k_p counts completed
    batches (at least one) until the completed documents reach b_p; the other ranks' W-1 batches in flight then
    complete too. At the first pause with W > 1 the first batch of the queue (the longest documents) is one of
    those in flight, so it is not counted in k_1. With one rank nothing is in flight.
    """
    pauses: list[int] = []
    done = 0
    for p, boundary in enumerate(boundaries):
        if done >= len(sizes):
            break  # a pause waits for a batch to finish; none is left
        completed = sum(sizes[:done])
        counted = 0
        reached = False
        for i in range(done, len(sizes)):
            if p == 0 and ranks > 1 and i == 0:
                continue
            completed += sizes[i]
            counted += 1
            if completed >= boundary:
                reached = True
                break
        done = min(len(sizes), done + counted + ranks - 1) if reached else len(sizes)
        pauses.append(done)
    return pauses


def phase_schedule(
    lengths: list[int], batch_size: int, prefix_docs: int, num_phases: int, ranks: int, global_chunk_tokens: int
) -> list[dict]:
    """Every pause: its batches K, documents completed pd, the selection (document indices), its stream length
    |S| and its number of global-SGD chunks M = ceil((|S| - 1) / K_tokens)."""
    batches = make_batches(lengths, batch_size)
    queue = queue_order(batches, lengths)
    boundaries = phase_boundaries(prefix_docs, len(lengths), num_phases)
    schedule = []
    for p, done in enumerate(pause_points([len(batches[g]) for g in queue], boundaries, ranks)):
        completed = [(g, slot, doc) for g in queue[:done] for slot, doc in enumerate(batches[g])]
        completed.sort(key=lambda entry: (entry[0], entry[1]))
        selected = [doc for _, _, doc in completed[: boundaries[p]]]
        stream = sum(lengths[i] for i in selected)
        schedule.append(
            {
                "phase": p + 1,
                "batches": done,
                "docs_completed": len(completed),
                "docs_selected": len(selected),
                "selected": selected,
                "tokens": stream,
                "chunks": max(0, -(-(stream - 1) // global_chunk_tokens)),
            }
        )
    return schedule


# ---- 2.4 windows ------------------------------------------------------------------------------------------
def chunk_window(c: int, predictions: int, chunk: int, window: int) -> tuple[int, int, int]:
    """(w, chunk start, chunk end) in prediction indices for chunk c of a document with m = predictions targets."""
    start = c * chunk
    end = min((c + 1) * chunk, predictions)
    return max(0, end - window), start, end


# ---- 2.6 one document's LoRA --------------------------------------------------------------------------------
class DocumentLoRA:
    """One document's adapters: per layer application and site u -> s (u A^T) B^T, plus one on the logits."""

    def __init__(
        self, a: dict[str, list[torch.Tensor]], a_head: torch.Tensor, outs: dict[str, int], vocab: int, scale: float
    ) -> None:
        self.scale = scale
        self.a = {site: [torch.nn.Parameter(m.clone()) for m in mats] for site, mats in a.items()}
        self.b = {
            site: [torch.nn.Parameter(torch.zeros(outs[site], m.size(0))) for m in mats] for site, mats in a.items()
        }
        self.a_head = torch.nn.Parameter(a_head.clone())
        self.b_head = torch.nn.Parameter(torch.zeros(vocab, a_head.size(0)))

    def parameters(self) -> list[torch.nn.Parameter]:
        params = [self.a_head, self.b_head]
        for site in self.a:
            for a, b in zip(self.a[site], self.b[site], strict=True):
                params += [a, b]
        return params

    def delta(self, slot: int, site: str, inp: torch.Tensor) -> torch.Tensor | None:
        if site not in self.a:
            return None
        return ((inp @ self.a[site][slot].t()) @ self.b[site][slot].t()) * self.scale

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return ((h @ self.a_head.t()) @ self.b_head.t()) * self.scale

    def a_values(self) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
        return {site: [m.detach().clone() for m in mats] for site, mats in self.a.items()}, self.a_head.detach().clone()


class Draws:
    """The A matrices of adapter sets, from one seeded CPU generator in the record's order (compat README):
    per set, lm_head, then q, v, k, mlp, o for every layer application, each ``(bsz, rank, in)`` uniform."""

    def __init__(self, seed: int, sites: tuple[str, ...], applications: int, dim: int, rank: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.sites, self.applications, self.dim, self.rank = sites, applications, dim, rank

    def draw(self, bsz: int) -> list[tuple[dict[str, list[torch.Tensor]], torch.Tensor]]:
        """One set of ``bsz`` slots: for every slot, its A matrices per site and its lm_head A."""
        bound = 1.0 / math.sqrt(self.dim)

        def one() -> torch.Tensor:
            return torch.empty(bsz, self.rank, self.dim).uniform_(-bound, bound, generator=self.generator)

        head = one()
        per_site = {site: [one() for _ in range(self.applications)] for site in SITES if site in self.sites}
        return [({site: [m[b] for m in mats] for site, mats in per_site.items()}, head[b]) for b in range(bsz)]


# ---- 2.5 and 2.7 one document through its chunks ----------------------------------------------------------
def lora_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    if cfg.ttt_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.ttt_lora_lr, momentum=cfg.ttt_beta1, weight_decay=cfg.ttt_weight_decay)
    return torch.optim.AdamW(
        params,
        lr=cfg.ttt_lora_lr,
        betas=(cfg.ttt_beta1, cfg.ttt_beta2),
        eps=cfg.ttt_eps,
        weight_decay=cfg.ttt_weight_decay,
    )


def chunk_losses(
    model, tokens: list[int], start: int, c: int, predictions: int, lora: DocumentLoRA, cfg
) -> tuple[torch.Tensor, int, int]:
    """Per-target cross-entropy of chunk c (through its own window), and the chunk's first and end index."""
    w, c_start, c_end = chunk_window(c, predictions, cfg.ttt_chunk_size, cfg.ttt_eval_seq_len)
    inputs = tokens[start + w : start + c_end]
    targets = tokens[start + w + 1 : start + c_end + 1]
    logits = window_logits(model, inputs, lora)
    nll = F.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")
    return nll[c_start - w : c_end - w], c_start, c_end


def run_document(
    model,
    tokens: list[int],
    target_bytes: list[int],
    start: int,
    length: int,
    lora: DocumentLoRA,
    batch_steps: int,
    cfg,
    totals: dict,
) -> None:
    """Score every chunk of one document, each before the step that trains on it.

    The batch steps its optimizer at chunks ``0 .. batch_steps - 1`` (``TTT_GRAD_STEPS`` times each) for as long
    as any of its documents has a later chunk; this document contributes its chunk's mean loss while it has a
    later chunk of its own and a zero gradient otherwise (AdamW still decays its weights and, with beta1 > 0,
    still moves them: the kept A of its slot sees those steps).
    """
    predictions = length - 1
    chunks = -(-predictions // cfg.ttt_chunk_size)
    before = (totals["tokens"], totals["bytes"], totals["loss"])
    params = lora.parameters()
    opt = lora_optimizer(params, cfg)
    for c in range(max(chunks, batch_steps)):
        nll = None
        if c < chunks:
            nll, c_start, c_end = chunk_losses(model, tokens, start, c, predictions, lora, cfg)
            for j, value in zip(range(c_start, c_end), nll.tolist(), strict=True):
                totals["loss"] += value
                totals["tokens"] += 1
                totals["bytes"] += target_bytes[start + j]
                totals["scored"].append(start + j + 1)
        if c >= batch_steps:
            continue
        for g in range(cfg.ttt_grad_steps):
            if c < chunks - 1:
                if g > 0:
                    nll, _, _ = chunk_losses(model, tokens, start, c, predictions, lora, cfg)
                grads = torch.autograd.grad(nll.mean(), params, allow_unused=True)
                grads = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads, strict=True)]
            else:
                grads = [torch.zeros_like(p) for p in params]
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            opt.step()
    totals["units"][start + 1] = (totals["tokens"] - before[0], totals["bytes"] - before[1], totals["loss"] - before[2])


# ---- 2.8 global SGD on the selected documents --------------------------------------------------------------
def segment_boundaries(row: list[int], max_len: int) -> list[int]:
    """Spec 3.10: segment starts of a packed row (documents from each BOS, cut every max_len tokens from the
    document start), then the row length."""
    starts = [i for i, t in enumerate(row) if t == BOS]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    pieces = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(row)
        pieces += list(range(start, end, max_len))
    return pieces + [len(row)]


def global_lr(c: int, chunks: int, cfg) -> float:
    warmup = max(0, min(cfg.global_ttt_warmup_chunks, chunks - 1))
    if warmup > 0 and c < warmup:
        start = cfg.global_ttt_warmup_start_lr
        return start + (cfg.global_ttt_lr - start) * (c / max(warmup - 1, 1))
    return cfg.global_ttt_lr * 0.5 * (1.0 + math.cos(math.pi * max(c - warmup, 0) / max(chunks - 1 - warmup, 1)))


def row_loss(model, row: list[int], cfg) -> torch.Tensor:
    """Mean cross-entropy of one packed row (inputs row[:-1], targets row[1:])."""
    inputs, targets = row[:-1], torch.tensor(row[1:])
    if cfg.global_ttt_respect_doc_boundaries:
        logits = packed_logits(model, inputs, segment_boundaries(inputs, cfg.seq_len))
    else:
        n = cfg.seq_len
        logits = torch.cat([packed_logits(model, inputs[i : i + n], None) for i in range(0, len(inputs), n)])
    return F.cross_entropy(logits.float(), targets)


def global_sgd(model, stream: list[int], cfg, ranks: int) -> list[float]:
    """SGD on every weight over the concatenated selected documents; returns each trained chunk's lr."""
    total = len(stream) - 1
    size, seq = cfg.global_ttt_chunk_tokens, cfg.seq_len
    chunks = -(-total // size) if total > 0 else 0
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    rates = []
    for c in range(chunks - 1):  # the last chunk is never trained on
        c_start, c_end = c * size, min((c + 1) * size, total)
        sequences = (c_end - c_start) // seq
        if cfg.global_ttt_epochs <= 0 or sequences <= 0:
            continue
        lr = global_lr(c, chunks, cfg)
        rates.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        # Virtual rank r takes sequences [q r / W, q (r + 1) / W) and steps through them batch_seqs at a time;
        # step j averages (sum / W) the gradients of every rank's j-th batch, each the mean over its own row.
        shares = [(sequences * r // ranks, sequences * (r + 1) // ranks) for r in range(ranks)]
        rank_rows = []
        for first, last in shares:
            rows = []
            for b in range(first, last, cfg.global_ttt_batch_seqs):
                b_end = min(b + cfg.global_ttt_batch_seqs, last)
                rows.append(stream[c_start + b * seq : c_start + b_end * seq + 1])
            rank_rows.append(rows)
        for _ in range(cfg.global_ttt_epochs):
            for j in range(max(len(rows) for rows in rank_rows)):
                total_grads: list[torch.Tensor | None] = [None] * len(params)
                for rows in rank_rows:
                    if j >= len(rows):
                        continue
                    grads = torch.autograd.grad(row_loss(model, rows[j], cfg), params, allow_unused=True)
                    for i, grad in enumerate(grads):
                        if grad is not None:
                            total_grads[i] = grad.clone() if total_grads[i] is None else total_grads[i] + grad
                for p, grad in zip(params, total_grads, strict=True):
                    p.grad = None if grad is None else grad * (1.0 / ranks)
                if cfg.global_ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.global_ttt_grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        model.eval()
    for p in params:
        p.requires_grad_(False)
    return rates


# ---- the whole protocol ------------------------------------------------------------------------------------
def reference_phased(model, tokens, target_bytes, cfg, units: dict | None = None) -> tuple[float, int, int, list[dict]]:
    """(loss_sum, tokens_scored, bytes_scored, schedule); the model ends with the last phase's weights. ``units``,
    when given, gets each document's (tokens, bytes, loss_sum) under its first target's stream position.

    ``target_bytes[j]`` is the byte count of the target ``tokens[j + 1]``. Batches run in queue order in one
    process. The ``emulate_ranks`` W ranks shape the pauses and the global SGD, and own the adapters (spec 2.11
    item 4, the rule it suggests): the j-th batch claimed after a pause (or the start) is rank j mod W's, which
    keeps its own 64-slot set (warm-started A per slot) and its own A generator, seeded with ``seed`` as every
    rank of the record seeds its CPU generator alike.
    """
    tokens, target_bytes = [int(t) for t in tokens], [int(b) for b in target_bytes]
    if len(target_bytes) != len(tokens) - 1:
        raise ValueError(f"{len(target_bytes)} byte counts for {len(tokens) - 1} targets")
    documents = select_documents(find_documents(tokens), cfg.val_doc_fraction, cfg.seed, cfg.max_docs)
    lengths = [length for _, length in documents]
    ranks = cfg.emulate_ranks
    schedule = phase_schedule(
        lengths,
        cfg.ttt_batch_size,
        cfg.phased_ttt_prefix_docs,
        cfg.phased_ttt_num_phases,
        ranks,
        cfg.global_ttt_chunk_tokens,
    )
    batches = make_batches(lengths, cfg.ttt_batch_size)
    queue = queue_order(batches, lengths)

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = model.config
    dim, kv = config.model_dim, config.num_kv_heads * (config.model_dim // config.num_heads)
    outs = {"q": dim, "k": kv, "v": kv, "o": dim, "mlp": dim}
    sites = (
        ("q", "v")
        + (("k",) if cfg.ttt_k_lora else ())
        + (("mlp",) if cfg.ttt_mlp_lora else ())
        + (("o",) if cfg.ttt_o_lora else ())
    )
    rank = cfg.ttt_lora_rank
    scale = 1.0 if cfg.ttt_lora_alpha is None else cfg.ttt_lora_alpha / rank
    full = cfg.ttt_batch_size

    draws = [Draws(cfg.seed, sites, layer_applications(model), dim, rank) for _ in range(ranks)]
    kept = [d.draw(full) for d in draws]  # each rank's reusable set: A per slot
    totals = {"loss": 0.0, "tokens": 0, "bytes": 0, "scored": [], "units": {} if units is None else units}
    pauses = {entry["batches"]: entry for entry in schedule}
    segment_start = 0
    for claimed, g in enumerate(queue):
        v = (claimed - segment_start) % ranks
        batch = batches[g]
        if len(batch) == full:
            if not cfg.ttt_warm_start_a:
                kept[v] = draws[v].draw(full)
            slots = kept[v]
        else:
            slots = draws[v].draw(len(batch))  # another size: a brand-new set
        chunks = [-(-(lengths[i] - 1) // cfg.ttt_chunk_size) for i in batch]
        batch_steps = max(chunks) - 1
        for slot, i in enumerate(batch):
            a, a_head = slots[slot]
            lora = DocumentLoRA(a, a_head, outs, config.vocab_size, scale)
            start, length = documents[i]
            run_document(model, tokens, target_bytes, start, length, lora, batch_steps, cfg, totals)
            if len(batch) == full:
                kept[v][slot] = lora.a_values()
        pause = pauses.get(claimed + 1)
        if pause is not None:
            stream = [t for i in pause["selected"] for t in tokens[documents[i][0] : documents[i][0] + lengths[i]]]
            pause["lr"] = global_sgd(model, stream, cfg, ranks)
            kept = [d.draw(full) for d in draws]  # new adapters on every rank after every phase
            segment_start = claimed + 1
    return totals["loss"], totals["tokens"], totals["bytes"], schedule
