from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from lmcache_lab.policies.sampled import NO_GAP, ChunkInfo, ScoredPolicy

STATIC = ("bias", "tail", "uses", "depth", "cont", "segment", "length", "gap", "no_gap")
AGED = ("bias", "tail", "used", "cont")      # multiplied by log(1 + age)


def static_features(info: ChunkInfo) -> list[float]:
    """Features fixed between two uses of a chunk (order: `STATIC`)."""
    return [1.0, float(info.tail), math.log1p(info.uses), math.log1p(info.depth), float(info.cont),
            math.log1p(info.segment), math.log1p(info.length),
            math.log1p(info.gap) if info.gap != NO_GAP else 0.0, float(info.gap == NO_GAP)]


def aged_features(info: ChunkInfo) -> list[float]:
    """Features whose weight is per unit of log(1 + age) (order: `AGED`)."""
    return [1.0, float(info.tail), float(info.uses > 0), float(info.cont)]


def features(info: ChunkInfo, age: int) -> list[float]:
    la = math.log1p(age)
    return static_features(info) + [la * z for z in aged_features(info)]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC of `scores` for 0/1 `labels` (ties count one half); nan if one class is
    missing."""
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    pos = labels.astype(bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if not n1 or not n0:
        return float("nan")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1.0, iterations: int = 8) -> np.ndarray:
    """Weights of an L2-regularised logistic regression, by Newton's method (IRLS):
    w <- w + (X'WX + ridge I)^-1 (X'(y - p) - ridge w), W = diag(p(1 - p)). O(n d^2) per step."""
    w = np.zeros(x.shape[1])
    eye = ridge * np.eye(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (y - p) - ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + eye
        w = w + np.linalg.solve(hess, grad)
    return w


class LearnedPolicy(ScoredPolicy):
    """Evict the leaf least likely to be used again soon, as predicted by an online model
    (in the spirit of LRB: Song, Berger, Li & Lloyd, "Learning Relaxed Belady for Content
    Distribution Network Caching", NSDI'20).

    Training data, past only: at the start of each request `samples_per_request` resident leaves
    are drawn (seeded) and their features recorded (`features`: what the chain showed at the last
    use, and the age since it). The label is 1 if a request uses the chunk (hit, or stores it
    again after an eviction) within `horizon` requests of the draw, 0 once the horizon has passed
    without a use. The horizon is the cache's size in requests (LRB's Belady boundary, estimated):
    `horizon_factor` x resident chunks / mean new chunks stored per request, read at the draw.

    Model: logistic regression on `STATIC` features plus `AGED` features times log(1 + age),
    refitted by `fit_logistic` every `retrain_every` new labels on the latest `window` labels.
    The logit of a chunk is then `b + g * log(1 + age)` with `b`, `g` fixed between its uses, so
    scoring a sampled leaf costs a few multiplications; `b`, `g` are recomputed when the model
    changed since they were cached. The victim is the lowest predicted reuse probability per byte
    among `samples` sampled leaves (`ScoredPolicy`).

    Trust: before each refit, the current model and recency alone (-age, LRU's ranking) are scored
    (ROC AUC) on the labels that came in since the model was fitted, i.e. out of sample. The model
    ranks victims only while its AUC beats recency's by `margin`; otherwise, and until then, the
    oldest sampled leaf is evicted (`margin` < 0: the model from its first fit, untested).

    Cost: a fit is O(window * d^2) (d = 13), `training_seconds` and `fits` report it; per request
    O(samples_per_request + labels resolved), per eviction O(samples). Before each refit the
    current model is scored on the labels that came in since it was fitted (out of sample);
    `aucs` and `recency_aucs` keep those AUCs, the numbers to read against the noisy-oracle curve.
    """
    name = "learned"

    def __init__(self, chunk_tokens: int = 256, samples: int = 32, seed: int = 0, samples_per_request: int = 4,
                 horizon_factor: float = 1.0, retrain_every: int = 2000, window: int = 20000, ridge: float = 1.0,
                 margin: float = 0.02, **params):
        super().__init__(chunk_tokens, samples, seed, **params)
        if samples_per_request < 1 or retrain_every < 1 or window < retrain_every or ridge < 0:
            raise ValueError(f"policy 'learned': need samples_per_request >= 1, retrain_every >= 1, "
                             f"window >= retrain_every, ridge >= 0; got {samples_per_request}, {retrain_every}, "
                             f"{window}, {ridge}")
        self.samples_per_request, self.retrain_every = samples_per_request, retrain_every
        self.window, self.ridge = window, ridge
        self.horizon_factor, self.margin = horizon_factor, margin
        self.weights: tuple[list[float], list[float]] | None = None   # (static, aged) weights
        self.version = 0
        self.fits = 0
        self.training_seconds = 0.0
        self.aucs: list[float] = []          # out-of-sample AUC of each fit on the next labels
        self._fitted: np.ndarray | None = None
        self.recency_aucs: list[float] = []  # AUC of recency alone on the same labels
        self.trusted = margin < 0            # the last model beat recency by `margin` out of sample
        self._inserts_per_request = 1.0      # EWMA of new chunks stored per request
        self._inserts = 0
        self._pending: dict = {}             # key -> row indices drawn from it, awaiting a label
        self._unlabeled: dict = {}           # row index -> deadline, for rows awaiting a label
        self._expiry: deque = deque()        # (deadline, key, row index) in draw order
        self._rows: dict[int, list[float]] = {}   # row index -> features at the draw
        self._next_row = 0
        self._labels: dict[int, float] = {}  # row index -> label
        self._labeled: deque = deque()       # row indices in labelling order
        self._new_labels = 0

    # ---- labels ---------------------------------------------------------------------------------
    def horizon(self) -> float:
        """The cache's size in requests: resident chunks / new chunks per request (EWMA)."""
        return max(1.0, self.horizon_factor * len(self.info) / max(self._inserts_per_request, 1e-9))

    def _label(self, row: int, y: float) -> None:
        self._labels[row] = y
        self._labeled.append(row)
        self._new_labels += 1

    def _seen_again(self, key) -> None:
        for row in self._pending.pop(key, ()):
            deadline = self._unlabeled.pop(row, None)
            if deadline is not None:
                self._label(row, 1.0 if self.now <= deadline else 0.0)

    def _request_started(self):
        now = self.now
        self._inserts_per_request += 0.01 * (self._inserts - self._inserts_per_request)
        self._inserts = 0
        expiry = self._expiry
        while expiry and expiry[0][0] < now:
            _, key, row = expiry.popleft()
            if self._unlabeled.pop(row, None) is not None:
                self._label(row, 0.0)
                waiting = self._pending[key]
                waiting.remove(row)
                if not waiting:
                    del self._pending[key]
        leaves, info = self._leaves, self.info
        if leaves:
            deadline = now + self.horizon()
            for _ in range(self.samples_per_request):
                key = leaves[self._rng.randrange(len(leaves))]
                row = self._next_row = self._next_row + 1
                self._rows[row] = features(info[key], now - info[key].last)
                self._pending.setdefault(key, []).append(row)
                self._unlabeled[row] = deadline
                self._expiry.append((deadline, key, row))
        if self._new_labels >= self.retrain_every:
            self.retrain()

    def retrain(self) -> None:
        """Fit the model on the latest `window` labels (rows no longer needed are dropped)."""
        t0 = time.perf_counter()
        while len(self._labeled) > self.window:
            row = self._labeled.popleft()
            del self._labels[row], self._rows[row]
        rows = list(self._labeled)
        y = np.fromiter((self._labels[r] for r in rows), dtype=np.float64, count=len(rows))
        if 0 < y.sum() < len(y):
            x = np.asarray([self._rows[r] for r in rows], dtype=np.float64)
            if self._fitted is not None:   # the labels that came in since the last fit: out of sample
                fresh = slice(len(rows) - self._new_labels, None)
                auc = roc_auc(x[fresh] @ self._fitted, y[fresh])
                recency = roc_auc(-x[fresh, len(STATIC)], y[fresh])     # -log(1 + age): LRU's ranking
                if auc == auc:
                    self.aucs.append(auc)
                    self.recency_aucs.append(recency)
                    self.trusted = auc >= recency + self.margin
            w = self._fitted = fit_logistic(x, y, self.ridge)
            self.weights = (w[:len(STATIC)].tolist(), w[len(STATIC):].tolist())
            self.version += 1
            self.fits += 1
        self._new_labels = 0
        self.training_seconds += time.perf_counter() - t0

    def replay_stats(self) -> dict:
        """Training cost, reported by the replay beside the hit rate."""
        return {"model_fits": self.fits, "training_seconds": self.training_seconds,
                "model_auc": float(np.mean(self.aucs)) if self.aucs else None,
                "recency_auc": float(np.mean(self.recency_aucs)) if self.recency_aucs else None,
                "model_trusted_fits": int(sum(a >= r + self.margin for a, r in zip(self.aucs, self.recency_aucs)))}

    # ---- hooks ----------------------------------------------------------------------------------
    def _stored(self, key, info):
        self._inserts += 1
        self._seen_again(key)

    def _used(self, key, info, age):
        self._seen_again(key)

    def _score(self, info, now):
        w = self.weights
        if w is None or not self.trusted:
            return info.last - now
        cached = info.cache
        if cached is None or cached[0] != self.version:
            b = sum(a * c for a, c in zip(w[0], static_features(info)))
            g = sum(a * c for a, c in zip(w[1], aged_features(info)))
            cached = info.cache = (self.version, b, g)
        logit = cached[1] + cached[2] * math.log1p(now - info.last)
        return (1.0 / (1.0 + math.exp(-logit)) if logit > -30.0 else 0.0) / info.nbytes

    def _touched(self, key, info):
        info.cache = None
