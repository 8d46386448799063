"""Data filters: which transferred samples a receiver learns from.

One filter exists per (LLM, SLM_k) pair and per direction. Every filter has the same
interface, so the plug-in and the ablations (``none``, ``random``, ``loss``) differ
only in the ``kind`` config field:

    select(contexts [N, d], budget, rng) -> indices      (this round's training set)
    decision_predictions() -> [M] or None                (rewards predicted for the last selection, when made)
    update(contexts_selected [M, d], rewards [M], predicted)  (bandit feedback)
    state_dict() / load_state_dict(state)                (persist across rounds)
    diagnostics() -> dict                                (numbers worth logging)

``LadaFilter`` is a neural contextual bandit of the EE-Net kind (Ban et al.,
arXiv 2110.03177): an exploitation net f1 regresses the observed reward of a sample
from its context; an exploration net f2 regresses the residual reward - f1(x) (f1 as it was when the sample was chosen) from a
summary of f1's gradient. The score f1 + alpha * f2 is min-max normalised over the
candidates and samples above a threshold are kept (at most ``budget``). With no reward
history yet (round 1) the filter clusters the contexts with k-means and takes a budget
spread over the clusters.

Context layout used by the plug-in (``lada.plugin.lada.CONTEXT_SCALARS``): the
receiver's mean-pooled hidden state, then four scalars
``[receiver NLL per token, sender log-prob per token, steps, tokens]``; the ``loss``
filter reads the NLL column at ``FilterConfig.nll_column`` (-4 for that layout).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from lada.plugin.options import FILTER_KINDS, FilterConfig  # noqa: F401  (FilterConfig re-exported)


def _generator(rng: torch.Generator | int | None, fallback: int) -> torch.Generator:
    if isinstance(rng, torch.Generator):
        return rng
    g = torch.Generator()
    g.manual_seed(fallback if rng is None else int(rng))
    return g


def _check_contexts(contexts: Tensor, where: str) -> Tensor:
    if contexts.dim() != 2:
        raise ValueError(f"{where}: contexts must be [N, d], got shape {tuple(contexts.shape)}")
    if not torch.isfinite(contexts).all():
        bad = (~torch.isfinite(contexts)).nonzero()[0].tolist()
        raise ValueError(f"{where}: contexts hold a non-finite value at row {bad[0]}, column {bad[1]}")
    return contexts.detach().float().cpu()


class DataFilter:
    """Base class: keeps everything. Subclasses override ``select`` (and ``update``)."""

    kind = "none"

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._diag: dict[str, float] = {}

    def select(self, contexts: Tensor, budget: int, rng: torch.Generator | int | None = None) -> list[int]:
        contexts = _check_contexts(contexts, f"{self.kind} filter")
        n = contexts.shape[0]
        self._diag = {"candidates": float(n), "selected": float(n)}
        return list(range(n))

    def decision_predictions(self) -> Tensor | None:
        """The rewards the filter predicted for its last selection, in selection order,
        at the moment it chose (None: it predicts nothing)."""
        return None

    def update(self, contexts_selected: Tensor, rewards: Tensor, predicted: Tensor | None = None) -> None:
        """Record feedback; only the bandit learns from it, the others just count."""
        self._diag["updates"] = self._diag.get("updates", 0.0) + 1
        if len(rewards):
            self._diag["mean_reward"] = float(torch.as_tensor(rewards, dtype=torch.float32).mean())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"{self.kind} filter: cannot load the state of a {state.get('kind')!r} filter")

    def diagnostics(self) -> dict[str, float]:
        return dict(self._diag)


class RandomFilter(DataFilter):
    """A uniformly random subset of the same budget (ablation: is the bandit better than chance?)."""

    kind = "random"

    def select(self, contexts: Tensor, budget: int, rng: torch.Generator | int | None = None) -> list[int]:
        contexts = _check_contexts(contexts, "random filter")
        n = contexts.shape[0]
        g = _generator(rng, self.cfg.seed)
        chosen = torch.randperm(n, generator=g)[: max(0, min(budget, n))].tolist()
        self._diag = {"candidates": float(n), "selected": float(len(chosen))}
        return chosen


class LossFilter(DataFilter):
    """The ``budget`` candidates with the lowest receiver NLL per token: the easiest
    paths for this receiver (the learnability heuristic without learning)."""

    kind = "loss"

    def select(self, contexts: Tensor, budget: int, rng: torch.Generator | int | None = None) -> list[int]:
        contexts = _check_contexts(contexts, "loss filter")
        n, d = contexts.shape
        col = self.cfg.nll_column
        if not -d <= col < d:
            raise ValueError(f"loss filter: nll_column {col} is out of range for contexts with {d} columns")
        nll = contexts[:, col]
        order = torch.argsort(nll, stable=True)
        chosen = order[: max(0, min(budget, n))].tolist()
        self._diag = {"candidates": float(n), "selected": float(len(chosen)),
                      "selected_mean_nll": float(nll[chosen].mean()) if chosen else 0.0}
        return chosen


# ----------------------------------------------------------------------------- k-means

def kmeans(x: Tensor, k: int, seed: int, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, deterministic by ``seed``.

    Returns (centroids [k', d], assignment [N]) with k' = min(k, distinct points): more
    clusters than distinct points would only split duplicates. A cluster that empties
    during the iterations takes the point farthest from its centroid among clusters
    that have a member to spare, so every cluster keeps at least one member and every
    centroid is a mean of real points (never of an empty set)."""
    n = x.shape[0]
    k = max(1, min(k, n, int(torch.unique(x, dim=0).shape[0]) if n else 1))
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)].clone()
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).pow(2).min(dim=1).values
        # k <= distinct points, so some point is away from every centroid so far
        nxt = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        centroids = torch.cat([centroids, x[nxt]])
    assign = torch.zeros(n, dtype=torch.long)
    for it in range(iters):
        dist = torch.cdist(x, centroids)
        new_assign = dist.argmin(dim=1)
        own = dist.gather(1, new_assign.unsqueeze(1)).squeeze(1)
        for c in range(k):
            if (new_assign == c).any():
                continue
            sizes = torch.bincount(new_assign, minlength=k)
            spare = sizes[new_assign] > 1  # moving such a point empties no other cluster
            far = int(torch.where(spare, own, torch.full_like(own, -1.0)).argmax())
            new_assign[far] = c
            own[far] = 0.0  # now its cluster's only member, at distance 0 from its new centroid
        if it > 0 and torch.equal(new_assign, assign):
            break
        assign = new_assign
        centroids = torch.stack([x[assign == c].mean(dim=0) for c in range(k)])
    return centroids, assign


def cluster_spread(x: Tensor, budget: int, k: int, seed: int) -> list[int]:
    """``budget`` indices spread evenly over k-means clusters: round-robin over the
    clusters, each cluster's members nearest to its centroid first."""
    centroids, assign = kmeans(x, k, seed)
    dist = torch.cdist(x, centroids).gather(1, assign.unsqueeze(1)).squeeze(1)
    queues = []
    for c in range(centroids.shape[0]):
        members = (assign == c).nonzero().squeeze(1)
        queues.append(members[torch.argsort(dist[members], stable=True)].tolist())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < budget and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(chosen) < budget:
                chosen.append(q[depth])
        depth += 1
    return chosen


# ----------------------------------------------------------------------------- EE-Net bandit

def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class LadaFilter(DataFilter):
    """Learnability-aware filter: EE-Net style neural contextual bandit.

    f1 (exploitation) maps a standardised context to the predicted (standardised)
    reward. f2 (exploration) maps phi(x), f1's hidden activations averaged over blocks
    of ``block_size`` units, to the residual reward - f1(x). The last hidden layer's
    activations are exactly the gradient of f1 with respect to its output weights,
    so phi is the block-averaged gradient summary EE-Net uses in practice.
    Both nets train ``epochs`` passes over the replay history at every ``update``.
    """

    kind = "lada"

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        self.dim: int | None = None
        self.f1: nn.Sequential | None = None
        self.f2: nn.Sequential | None = None
        self.opt1: torch.optim.Optimizer | None = None
        self.opt2: torch.optim.Optimizer | None = None
        # running context statistics (Chan's parallel update), used to standardise inputs
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        # replay history of (raw context, reward, f1's predicted reward when the sample
        # was chosen), FIFO-capped
        self.hist_x = torch.zeros(0, 0)
        self.hist_r = torch.zeros(0)
        self.hist_f1 = torch.zeros(0)
        self._decision: Tensor | None = None
        self.r_mean = 0.0
        self.r_std = 1.0
        self.num_updates = 0

    # ---- setup
    def _phi_dim(self) -> int:
        return 2 * math.ceil(self.cfg.hidden / self.cfg.block_size)

    def _build(self, dim: int) -> None:
        self.dim = dim
        # Weights come from our own generator (same seed, same nets); the default init
        # runs inside fork_rng so building a filter never moves the global RNG.
        g = torch.Generator().manual_seed(self.cfg.seed)
        with torch.random.fork_rng(devices=[]):
            self.f1 = _mlp(dim, self.cfg.hidden)
            self.f2 = _mlp(self._phi_dim(), self.cfg.hidden)
        for p in list(self.f1.parameters()) + list(self.f2.parameters()):
            with torch.no_grad():
                if p.dim() > 1:
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
                else:
                    p.zero_()
        self.opt1 = torch.optim.Adam(self.f1.parameters(), lr=self.cfg.lr)
        self.opt2 = torch.optim.Adam(self.f2.parameters(), lr=self.cfg.lr)
        self.mean = torch.zeros(dim)
        self.m2 = torch.zeros(dim)
        self.hist_x = torch.zeros(0, dim)
        self.hist_f1 = torch.zeros(0)

    def _ensure(self, dim: int, where: str) -> None:
        if self.dim is None:
            self._build(dim)
        elif dim != self.dim:
            raise ValueError(f"{where}: contexts have {dim} columns but this filter was built for {self.dim}")

    # ---- standardisation
    def _observe(self, x: Tensor) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.count * n_b / n
        self.count = n

    def _standardise(self, x: Tensor) -> Tensor:
        if self.count < 2:
            return x - self.mean
        std = (self.m2 / (self.count - 1)).sqrt()
        return (x - self.mean) / torch.where(std > 1e-8, std, torch.ones_like(std))

    # ---- networks
    def _phi(self, z: Tensor) -> Tensor:
        """Block-averaged hidden activations of f1 (detached: f2 does not train f1)."""
        h1 = self.f1[1](self.f1[0](z))
        h2 = self.f1[3](self.f1[2](h1))
        parts = []
        for h in (h1, h2):
            b = self.cfg.block_size
            pad = (-h.shape[1]) % b
            if pad:
                h = torch.cat([h, h[:, -1:].expand(-1, pad)], dim=1)
            parts.append(h.reshape(h.shape[0], -1, b).mean(dim=2))
        return torch.cat(parts, dim=1).detach()

    @torch.no_grad()
    def predict(self, contexts: Tensor) -> tuple[Tensor, Tensor]:
        """(f1, f2) per context, in standardised reward units."""
        contexts = _check_contexts(contexts, "lada filter")
        self._ensure(contexts.shape[1], "lada filter")
        z = self._standardise(contexts)
        return self.f1(z).squeeze(1), self.f2(self._phi(z)).squeeze(1)

    def scores(self, contexts: Tensor) -> Tensor:
        """Min-max normalised f1 + alpha * f2 over the given candidates (all ones if tied)."""
        f1, f2 = self.predict(contexts)
        raw = f1 + self.cfg.alpha * f2
        lo, hi = raw.min(), raw.max()
        if float(hi - lo) <= 1e-12:
            return torch.ones_like(raw)
        return (raw - lo) / (hi - lo)

    # ---- interface
    def select(self, contexts: Tensor, budget: int, rng: torch.Generator | int | None = None) -> list[int]:
        contexts = _check_contexts(contexts, "lada filter")
        n = contexts.shape[0]
        self._ensure(contexts.shape[1], "lada filter")
        budget = max(0, min(budget, n))
        f1, _ = self.predict(contexts)  # f1 at decision time, with the standardisation it was trained with
        self._decision = torch.zeros(0)
        if n == 0 or budget == 0:
            self._observe(contexts)
            self._diag = {"candidates": float(n), "selected": 0.0, "cold_start": float(len(self.hist_r) == 0)}
            return []
        if len(self.hist_r) == 0:
            self._observe(contexts)
            chosen = cluster_spread(self._standardise(contexts), budget, self.cfg.num_clusters, self.cfg.seed)
            self._decision = f1[chosen] * self.r_std + self.r_mean
            self._diag = {"candidates": float(n), "selected": float(len(chosen)), "cold_start": 1.0,
                          "history": 0.0}
            return chosen
        score = self.scores(contexts)
        order = torch.argsort(-score, stable=True)
        chosen = [i for i in order.tolist() if score[i] >= self.cfg.threshold][:budget]
        # The candidates join the input statistics only after scoring, so the nets score
        # with the standardisation they were trained with; the next update retrains on it.
        self._observe(contexts)
        pred = f1[chosen] * self.r_std + self.r_mean
        self._decision = pred.clone()
        self._diag = {"candidates": float(n), "selected": float(len(chosen)), "cold_start": 0.0,
                      "history": float(len(self.hist_r)),
                      "candidates_mean_predicted_reward": float((f1 * self.r_std + self.r_mean).mean())}
        if chosen:  # (threshold 1 with ties aside, the best candidate always passes)
            self._diag.update({"mean_score": float(score[chosen].mean()), "mean_predicted_reward": float(pred.mean())})
        return chosen

    def decision_predictions(self) -> Tensor | None:
        return None if self._decision is None else self._decision.clone()

    def update(self, contexts_selected: Tensor, rewards: Tensor, predicted: Tensor | None = None) -> None:
        """Add (context, reward, f1's prediction at decision time) to the history and
        retrain. ``predicted`` comes from ``decision_predictions()``; when None (feedback
        on contexts this filter did not choose) f1's current prediction stands in."""
        x = _check_contexts(contexts_selected, "lada filter update")
        r = torch.as_tensor(rewards, dtype=torch.float32).detach().cpu().reshape(-1)
        if x.shape[0] != r.shape[0]:
            raise ValueError(f"lada filter update: {x.shape[0]} contexts but {r.shape[0]} rewards")
        if not torch.isfinite(r).all():
            raise ValueError("lada filter update: rewards hold a non-finite value")
        self._ensure(x.shape[1], "lada filter update")
        if predicted is None:
            f1, _ = self.predict(x)
            predicted = f1 * self.r_std + self.r_mean
        predicted = torch.as_tensor(predicted, dtype=torch.float32).detach().cpu().reshape(-1)
        if predicted.shape[0] != r.shape[0]:
            raise ValueError(f"lada filter update: {predicted.shape[0]} predictions but {r.shape[0]} rewards")
        if self.count == 0:  # update before any select: the contexts still define the scale
            self._observe(x)
        cap = self.cfg.history_size
        self.hist_x = torch.cat([self.hist_x, x])[-cap:]
        self.hist_r = torch.cat([self.hist_r, r])[-cap:]
        self.hist_f1 = torch.cat([self.hist_f1, predicted])[-cap:]
        self.num_updates += 1
        loss1, loss2 = self._train()
        self._diag.update({"updates": float(self.num_updates), "history": float(len(self.hist_r)),
                           "mean_reward": float(r.mean()) if len(r) else 0.0,
                           "f1_loss": loss1, "f2_loss": loss2})

    def _train(self) -> tuple[float, float]:
        """``epochs`` passes of f1 on the standardised rewards, then of f2 on the residual
        of each reward against f1's prediction *when the sample was chosen* (EE-Net: the
        exploration net learns how wrong the exploitation net was at decision time; the
        freshly refitted f1's in-sample residual would be near zero)."""
        n = len(self.hist_r)
        if n == 0:
            return 0.0, 0.0
        self.r_mean = float(self.hist_r.mean())
        self.r_std = float(self.hist_r.std()) if n > 1 and float(self.hist_r.std()) > 1e-12 else 1.0
        z = self._standardise(self.hist_x)
        y = (self.hist_r - self.r_mean) / self.r_std
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.num_updates)
        loss1 = self._fit(self.f1, self.opt1, z, y, g)
        with torch.no_grad():
            resid = y - (self.hist_f1 - self.r_mean) / self.r_std
            phi = self._phi(z)
        loss2 = self._fit(self.f2, self.opt2, phi, resid, g)
        return loss1, loss2

    def _fit(self, net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, g: torch.Generator) -> float:
        bs = self.cfg.batch_size
        last = 0.0
        for _ in range(self.cfg.epochs):
            perm = torch.randperm(len(y), generator=g)
            total = 0.0
            for i in range(0, len(y), bs):
                idx = perm[i:i + bs]
                loss = nn.functional.mse_loss(net(x[idx]).squeeze(1), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            last = total / len(y)
        return last

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.dim is None:
            return state
        state.update({"dim": self.dim, "f1": self.f1.state_dict(), "f2": self.f2.state_dict(),
                      "opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(),
                      "count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone(),
                      "hist_x": self.hist_x.clone(), "hist_r": self.hist_r.clone(),
                      "hist_f1": self.hist_f1.clone(),
                      "r_mean": self.r_mean, "r_std": self.r_std, "num_updates": self.num_updates})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "dim" not in state:
            return
        self._build(int(state["dim"]))
        self.f1.load_state_dict(state["f1"])
        self.f2.load_state_dict(state["f2"])
        self.opt1.load_state_dict(state["opt1"])
        self.opt2.load_state_dict(state["opt2"])
        self.count = int(state["count"])
        self.mean, self.m2 = state["mean"].clone(), state["m2"].clone()
        self.hist_x, self.hist_r = state["hist_x"].clone(), state["hist_r"].clone()
        self.hist_f1 = state["hist_f1"].clone()
        self.r_mean, self.r_std = float(state["r_mean"]), float(state["r_std"])
        self.num_updates = int(state["num_updates"])


_KINDS: dict[str, type[DataFilter]] = {"none": DataFilter, "random": RandomFilter, "loss": LossFilter, "lada": LadaFilter}


def make_filter(cfg: FilterConfig) -> DataFilter:
    if cfg.kind not in _KINDS:
        raise ValueError(f"unknown filter kind {cfg.kind!r}; expected one of {FILTER_KINDS}")
    return _KINDS[cfg.kind](cfg)
