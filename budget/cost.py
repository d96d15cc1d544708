"""The work each protocol does on the reference's 8 ranks, as features a few calibrated constants turn into seconds.

A feature is a count with a physical meaning on the slowest rank: TFLOPs of forward token-passes (scoring),
TFLOPs of the training passes, optimizer steps (phased: scaled by layer applications, the kernels of a step), LoRA
parameters stepped by Adam, global-SGD chunk-epochs. Chunked TTT splits every chunk evenly, so its features
are closed forms. Phased TTT claims whole document batches first-come-first-served and pauses for global SGD,
so its features come from simulating the 8 ranks (:func:`simulate_phased`): load imbalance, the barrier
stalls and the long-document tail are in the result. Plain Python and numpy: no torch.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from pgttt.api.challenge import REFERENCE_GPUS

from .settings import ChunkedSettings, ModelShape, PhasedSettings, ValFamily

CHUNKED_FEATURES = ("score_tflop", "score_step", "train_tflop", "train_step", "compile", "sdpa_attention_tflop")
PHASED_FEATURES = ("score_tflop", "train_tflop", "step", "adam_gparam")
LORA_PARAMS_PER_RANK = 87_040  # adapter parameters per document per unit of rank (frontier spec 2.6)
STEP_SCALE_APPLICATIONS = 17  # step features count kernels relative to 17 layer applications
# Document lengths: log(length) = mu + S*z + K*z^2 over the normal scores z of 50,000 evenly spaced quantiles,
# scaled to the family's target count. S and K were fitted (least squares on logs) to the logged facts of
# frontier spec 2.3 and 2.11: the longest batch's 16 documents span 30,339-97,114 tokens (model: 27,379-94,822)
# and the global-SGD chunks M_p of the phase pauses, 111/185/250 (CaseOps D=2000), 131/219/289 (D=2500),
# 95/158/213 (SP8192 D=2000); the model gives 110/185/252, 129/220/293, 93/157/214.
DOC_LENGTH_S, DOC_LENGTH_K = 0.86, 0.08


# ---- documents -----------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _standard_scores(documents: int) -> np.ndarray:
    normal = NormalDist()
    return np.array([normal.inv_cdf((k + 0.5) / documents) for k in range(documents)])


def document_targets(family: ValFamily, lengths: tuple[int, ...] | None = None) -> np.ndarray:
    """Targets per document, ascending: the given lengths (a real dataset's), else the parametric stand-in."""
    if lengths is not None:
        return np.sort(np.asarray(lengths, dtype=np.float64))
    z = _standard_scores(family.documents)
    x = np.exp(DOC_LENGTH_S * z + DOC_LENGTH_K * z * z)
    return np.maximum(1.0, x / x.sum() * family.targets)


# ---- chunked -------------------------------------------------------------------------------------------------
def chunked_features(
    s: ChunkedSettings,
    family: ValFamily,
    shape: ModelShape,
    gpus: int = REFERENCE_GPUS,
    targets: int | None = None,
    compile_in_timer: bool = True,
    sdpa: bool = False,
) -> np.ndarray:
    """Features of the slowest rank for score-first chunked TTT over ``targets`` (default the family's).
    The records' stage timer includes compiling ``forward_logits`` (records.md 1.3): one fixed term. ``sdpa``:
    the one-GPU reference timings ran PyTorch SDPA attention instead of FlashAttention-3, a kernel with its
    own speed, so their attention FLOPs also count in a feature of their own."""
    total = targets or family.targets
    context = s.seq_len - s.stride
    windows = max(1, math.ceil((total - context) / s.stride))
    chunks = math.ceil(total / s.chunk_tokens) if s.ttt_epochs else 1
    per_chunk = math.ceil(math.ceil(windows / chunks) / gpus)  # windows a rank scores per chunk
    steps = math.ceil(per_chunk / s.batch_seqs) * chunks
    fwd = shape.linear_flops() + shape.attention_flops(s.seq_len / 2)  # every window runs all seq_len positions
    score_tflop = chunks * per_chunk * s.seq_len * fwd / 1e12
    seqs = math.ceil((s.chunk_tokens // s.seq_len) / gpus)  # sequences a rank trains on per chunk-epoch
    trained = s.ttt_epochs * (chunks - 1) if s.ttt_epochs else 0
    train_tflop = trained * seqs * s.seq_len * 3 * fwd / 1e12  # forward + backward ~ 3 forwards
    train_steps = trained * math.ceil(seqs / s.batch_seqs) if seqs else 0
    # Step counts are not scaled by layer applications here: a chunked training step's fixed cost is one
    # all-reduce and one SGD update per parameter tensor (11 physical layers in every record).
    attention = shape.attention_flops(s.seq_len / 2) * s.seq_len * (chunks * per_chunk + 3 * trained * seqs) / 1e12
    return np.array(
        [
            score_tflop,
            float(steps),
            train_tflop,
            float(train_steps),
            float(compile_in_timer),
            attention if sdpa else 0.0,
        ]
    )


# ---- phased --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhasedWork:
    """Per-batch features (queue order), documents per batch, and what the global phases need."""

    features: np.ndarray  # (batches, len(PHASED_FEATURES))
    docs: np.ndarray  # documents per batch, queue order
    batch_tokens: list[np.ndarray]  # per batch (queue order): stream tokens of each document, ascending
    queue_rank: np.ndarray  # ascending batch number of each queue position


def _width_sums(n: np.ndarray, chunk: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum over steps c < n of the batch width W_c = min((c+1)C, L), and of W_c squared."""
    k = seq_len // chunk
    m = np.minimum(n, k)
    s1 = chunk * m * (m + 1) / 2 + (n - m) * seq_len
    s2 = chunk * chunk * m * (m + 1) * (2 * m + 1) / 6 + (n - m) * float(seq_len) ** 2
    return s1, s2


def phased_work(
    s: PhasedSettings, family: ValFamily, shape: ModelShape, lengths: tuple[int, ...] | None = None
) -> PhasedWork:
    """Batches of ``ttt_batch_size`` documents by ascending length, queued by descending longest document."""
    targets = document_targets(family, lengths)
    bsz = s.ttt_batch_size
    groups = [targets[i : i + bsz] for i in range(0, len(targets), bsz)]
    order = sorted(range(len(groups)), key=lambda b: (-groups[b][-1], b))  # stable on equal maxima
    rows = np.array([len(groups[b]) for b in order], dtype=np.float64)
    n = np.ceil(np.array([groups[b][-1] for b in order]) / s.ttt_chunk_size)
    lora = 2 * LORA_PARAMS_PER_RANK * s.ttt_lora_rank
    linear = shape.linear_flops() + lora
    attn = shape.attention_flops(1.0) / 2  # per row-step: attention FLOPs ~ W^2 / 2

    def fwd(steps: np.ndarray) -> np.ndarray:
        s1, s2 = _width_sums(steps, s.ttt_chunk_size, s.ttt_eval_seq_len)
        return rows * (linear * s1 + attn * s2) / 1e12

    trained = np.maximum(n - 1, 0)  # the last chunk of the longest document is never trained on
    g = s.ttt_grad_steps
    features = np.stack(
        [
            fwd(n) + (g - 1) * fwd(trained),
            g * 2 * fwd(trained),  # backward through the frozen base: about two forwards
            (n + (g - 1) * trained) * shape.applications / STEP_SCALE_APPLICATIONS,
            g * trained * rows * LORA_PARAMS_PER_RANK * s.ttt_lora_rank / 1e9,
        ],
        axis=1,
    )
    tokens = [groups[b] + 1 for b in order]  # a document's slice holds its targets and its own BOS
    return PhasedWork(features, rows, tokens, np.array(order))


def global_feature(s: PhasedSettings, slice_tokens: float, gpus: int) -> float:
    """Chunk-epoch equivalents of one global-SGD phase on ``slice_tokens`` tokens (frontier spec 2.8). Every
    record ran 32K chunks over 8 ranks (2 sequences a rank, one step); how a step's cost splits between a
    fixed part and a per-sequence part cannot be calibrated from them: half and half is assumed."""
    chunks = max(0, math.ceil((slice_tokens - 1) / s.global_ttt_chunk_tokens) - 1)  # the last chunk is skipped
    seqs = math.ceil((s.global_ttt_chunk_tokens // s.ttt_eval_seq_len) / gpus)
    steps = math.ceil(seqs / s.global_ttt_batch_seqs) if seqs else 0
    return s.global_ttt_epochs * chunks * (0.5 * steps + 0.5 * seqs / 2)


@dataclass(frozen=True)
class PhasedRun:
    seconds: float
    critical: np.ndarray  # summed features of the rank that set each segment's end, over all segments
    last: np.ndarray  # the same for the last segment alone (after the last pause)
    global_units: float  # global-SGD feature summed over the phases
    pauses: tuple[int, ...]  # documents completed at each pause


def simulate_phased(
    s: PhasedSettings, work: PhasedWork, theta: np.ndarray, theta_global: float, gpus: int = REFERENCE_GPUS
) -> PhasedRun:
    """The reference's schedule (frontier spec 2.3, 2.8, 2.11): ranks claim the next queued batch when free;
    after a batch completes the count of finished documents, and once it reaches the next phase boundary
    every rank finishes the batch it holds and waits; then global SGD on the shortest ``b_p`` documents of
    the completed batches, and claiming resumes."""
    cost = (work.features @ theta).tolist()
    docs = work.docs.tolist()
    phases = s.phased_ttt_num_phases if s.phased_ttt_prefix_docs else 0
    bounds = [s.phased_ttt_prefix_docs * (p + 1) // phases for p in range(phases)]
    critical = np.zeros(work.features.shape[1])
    start, done_docs, nxt, total_global = 0.0, 0, 0, 0.0
    completed: list[int] = []
    pauses: list[int] = []
    while True:  # one segment: from the start (or a resume) to the end (or the next pause)
        clock = [start] * gpus
        ran: list[list[int]] = [[] for _ in range(gpus)]
        events = [(start, r) for r in range(gpus)]  # (time the rank is free, rank)
        holding: dict[int, int] = {}
        flagged = False
        while events:
            t, r = heapq.heappop(events)
            if r in holding:
                b = holding.pop(r)
                done_docs += docs[b]
                completed.append(b)
            flagged = flagged or (len(pauses) < phases and done_docs >= bounds[len(pauses)])
            if flagged or nxt >= len(cost):
                continue  # this rank waits at the barrier (or has nothing left)
            holding[r], clock[r] = nxt, t + cost[nxt]
            ran[r].append(nxt)
            heapq.heappush(events, (clock[r], r))
            nxt += 1
        worst = max(range(gpus), key=lambda q: clock[q])
        last = work.features[ran[worst]].sum(axis=0)
        critical += last
        seconds = clock[worst]
        if not flagged:
            break
        chosen = sorted(completed, key=lambda q: work.queue_rank[q])
        picked, need = 0.0, bounds[len(pauses)]
        for q in chosen:
            take = work.batch_tokens[q][:need]
            picked += float(take.sum())
            need -= len(take)
            if need <= 0:
                break
        units = global_feature(s, picked, gpus)
        total_global += units
        pauses.append(done_docs)
        start = seconds + theta_global * units
    return PhasedRun(seconds, critical, last, total_global, tuple(pauses))
