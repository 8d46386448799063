"""The LaDa plug-in: a learnability-aware data filter per (LLM, SLM_k) pair and
direction, and contrastive reasoning distillation, on top of any host.

A host calls three hooks around each transfer it trains on (see
``lada/protocol/host.py``):

    select       keep verified-correct candidates, score them with the receiver
                 (contexts), let the pair's filter choose; remember the choice and the
                 receiver's pre-update NLLs for the reward
    extra_loss   lambda * contrastive loss of (selected sender path y+, the receiver's
                 own path y- for the same question) against the receiver frozen at
                 round start
    after_update reward = exp(-nll_after) - exp(-nll_before) per selected path (or
                 its share of the headroom, ``reward = "relative"``); the filter
                 learns from it

Direction "down" (LLM -> SLM) runs on a client, "up" (SLM -> LLM) on the server. On
hosts that move nothing upward themselves (``transfers_up = False``, e.g. one-way CoT)
the plug-in adds its own upward phase: clients send their own verified paths on public
questions (text and scalars only), the server filters them per client and trains the
LLM with SFT plus the mirror contrastive loss.

The hooks use only ``node.workspace``, ``node.seed``, ``node.public`` and
``node.log_metric``, so they run on client and server nodes alike.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from lada.plugin.filter import DataFilter, FilterConfig, make_filter
from lada.plugin.losses import contrastive_loss
from lada.protocol.host import Phase, Plugin
from lada.protocol.payload import Payload

# The scalar features appended to the receiver's mean-pooled hidden state, in order.
# FilterConfig.nll_column = -4 points at the first one.
CONTEXT_SCALARS = ("receiver_nll_per_token", "sender_logprob_per_token", "steps", "tokens")
DIRECTIONS = ("down", "up")
UP_PHASE = Phase("lada_up", "train")
REWARDS = ("gain", "relative")


def learning_reward(nll_before: Tensor, nll_after: Tensor, kind: str = "gain") -> Tensor:
    """Per-sample reward from the receiver's per-token NLL of a path before and after
    the round's update, in geometric-mean token probability p = exp(-nll):

    gain      p_after - p_before. Bounded by the headroom 1 - p_before, so it favours
              paths the receiver finds hardest; where the public set mixes domains that
              means the domains the receiver is *not* tested on (docs/lada.md).
    relative  (p_after - p_before) / (1 - p_before): the share of the remaining gap the
              update closed. Headroom-neutral: a path counts as learnable when the
              receiver absorbs it, not when it was far away.
    """
    p0, p1 = torch.exp(-nll_before), torch.exp(-nll_after)
    if kind == "gain":
        return p1 - p0
    if kind == "relative":
        return (p1 - p0) / (1 - p0).clamp_min(1e-3)
    raise ValueError(f"learning_reward: kind must be one of {REWARDS}, got {kind!r}")


@dataclass
class LadaConfig:
    """Options of the ``lada`` plug-in (``[plugin]`` table; filter options in ``[plugin.filter]``)."""

    filter: FilterConfig = field(default_factory=FilterConfig)
    distill: str = "contrastive"  # sft: the host's transfer only | contrastive: + lambda_ * L_cd
    variant: str = "dpo"  # sequence-level DPO-like loss (the only one the protocol can carry; see docs/lada.md)
    lambda_: float = 0.1  # weight of the contrastive loss next to the (mean token) SFT loss; see docs/lada.md
    beta: float = 0.1  # DPO temperature on the log-ratio margin
    length_normalize: bool = False  # divide each log-ratio by its token count
    pair_batch: int = 4  # (y+, y-) pairs per optimizer step
    negative_paths: int = 2  # receiver paths sampled per question to find y-
    upward: bool = True  # add the SLM -> LLM phase on hosts that do not transfer upward
    up_novel_only: bool = True  # upward candidates: only questions the LLM's own paths fail
    up_questions: int = 0  # public questions each client answers per round upward (0: all)
    server_steps: int = 0  # LLM optimizer steps of the upward phase (0: train.server_steps)
    up_replay: float = 1.0  # server's own training examples mixed in per transferred path (against forgetting)
    up_max_epochs: float = 2.0  # cap the upward steps at this many passes over its (small) training mix
    score_batch_size: int = 16  # sequences per forward pass when computing contexts
    reward: str = "gain"  # the filter's feedback: gain | relative (gain / headroom); see learning_reward

    def validate(self, where: str = "[plugin]") -> None:
        from lada.config import ConfigError, check_choice, check_non_negative, check_positive

        if self.distill not in ("sft", "contrastive"):
            raise ConfigError(f"{where}.distill: must be 'sft' or 'contrastive', got {self.distill!r}")
        if self.variant == "distillm2":
            raise ConfigError(
                f"{where}.variant: 'distillm2' needs the sender's per-token distributions over a shared "
                "vocabulary, which no host transfers (only text and scalars cross the wire); the loss is "
                "available as lada.plugin.losses.distillm2_loss. Use 'dpo'.")
        check_choice(self, where, "reward", REWARDS)
        if self.variant != "dpo":
            raise ConfigError(f"{where}.variant: must be 'dpo', got {self.variant!r}")
        check_non_negative(self, where, "lambda_", "up_replay", "up_questions", "server_steps")
        check_positive(self, where, "beta", "pair_batch", "negative_paths", "score_batch_size", "up_max_epochs")
        self.filter.validate(f"{where}.filter")


# ----------------------------------------------------------------------------- contexts

@torch.no_grad()
def receiver_features(lm, prompts: list[str], texts: list[str], batch_size: int = 16, max_length: int = 256,
                      hidden: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """One forward pass of the receiver over ``prompt + path``.

    Returns (mean-pooled last hidden state over all real tokens [N, H] or None,
    NLL per target token [N], target tokens incl. EOS [N]); CPU float32. Tokenised
    exactly as training does, so the NLL is the quantity training lowers.
    """
    from lada.models.training import IGNORE, collate, encode_pairs

    n = len(prompts)
    if n != len(texts):
        raise ValueError(f"receiver_features: {n} prompts but {len(texts)} texts")
    if n == 0:
        return (torch.zeros(0, 0) if hidden else None), torch.zeros(0), torch.zeros(0)
    encoded = encode_pairs(lm.tokenizer, list(zip(prompts, texts)), max_length)
    order = sorted(range(n), key=lambda i: len(encoded[i]["input_ids"]))
    pooled: list[Tensor | None] = [None] * n
    nll, ntok = torch.zeros(n), torch.zeros(n)
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = collate([encoded[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=hidden)
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE
            logp = out.logits[:, :-1].float().log_softmax(-1)
            tok_lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            tok_lp = torch.where(keep, tok_lp, torch.zeros_like(tok_lp))
            counts = keep.sum(1)
            row_nll = (-tok_lp.sum(1) / counts.clamp_min(1)).cpu()
            if hidden:
                h = out.hidden_states[-1].float()
                m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                mean_h = ((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu()
            for j, i in enumerate(idx):
                nll[i] = row_nll[j]
                ntok[i] = float(counts[j])
                if hidden:
                    pooled[i] = mean_h[j]
    finally:
        model.train(was_training)
    return (torch.stack(pooled) if hidden else None), nll, ntok  # type: ignore[arg-type]


def path_steps(text: str) -> int:
    """Reasoning lines before the answer line."""
    from lada.data.answers import check_steps

    return check_steps(text).n_steps


def build_contexts(hidden: Tensor | None, nll: Tensor, items: list[dict], ntok: Tensor) -> Tensor:
    """[mean hidden | receiver NLL/token, sender log-prob/token, steps, tokens] per item."""
    sender = torch.tensor([float(it.get("sender_logprob", 0.0)) / max(1, int(it.get("n_tokens", 1) or 1))
                           for it in items])
    steps = torch.tensor([float(it["steps"]) if "steps" in it else float(path_steps(it["text"])) for it in items])
    scalars = torch.stack([nll, sender, steps, ntok], dim=1)
    return scalars if hidden is None else torch.cat([hidden, scalars], dim=1)


# ----------------------------------------------------------------------------- the plug-in

class LadaPlugin(Plugin):
    name = "lada"
    config_cls = LadaConfig

    def __init__(self, cfg, options: LadaConfig | None = None) -> None:
        super().__init__(cfg, options if options is not None else LadaConfig())
        self.opts: LadaConfig = self.options
        # (direction, rnd) -> {example_id: [(path text, verified)]}: the receiver's own
        # paths, sampled once per question and round (y- and the upward novelty test).
        self._own_paths: dict[tuple[str, int], dict[str, list[tuple[str, bool]]]] = {}

    # ---- helpers
    def _filter_cfg(self, direction: str, pair: int) -> FilterConfig:
        f = self.opts.filter
        seed = f.seed + 1000 * int(getattr(self.cfg, "seed", 0)) + 10 * pair + DIRECTIONS.index(direction)
        return dataclasses.replace(f, seed=seed)

    @staticmethod
    def _filter_path(node, direction: str, pair: int) -> Path:
        return Path(node.workspace) / f"filter-{direction}-{pair}.pt"

    @staticmethod
    def _pending_path(node, direction: str, pair: int) -> Path:
        return Path(node.workspace) / f"lada-pending-{direction}-{pair}.pt"

    def _load_filter(self, node, direction: str, pair: int) -> DataFilter:
        filt = make_filter(self._filter_cfg(direction, pair))
        path = self._filter_path(node, direction, pair)
        if path.exists():
            filt.load_state_dict(torch.load(path, weights_only=True))
        return filt

    def _save_filter(self, node, direction: str, pair: int, filt: DataFilter) -> None:
        path = self._filter_path(node, direction, pair)
        tmp = path.with_suffix(".tmp")
        torch.save(filt.state_dict(), tmp)
        tmp.replace(path)

    @staticmethod
    def _prefix(direction: str, pair: int) -> str:
        # A client's row is its own, so "down" needs no pair; the server's row holds every pair.
        return "lada_down_" if direction == "down" else f"lada_up{pair}_"

    def _max_length(self) -> int:
        train = getattr(self.cfg, "train", None)
        return int(getattr(train, "max_length", 256))

    def _features(self, lm, items: list[dict], hidden: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        return receiver_features(lm, [it["prompt"] for it in items], [it["text"] for it in items],
                                 self.opts.score_batch_size, self._max_length(), hidden)

    # ---- hooks
    def select(self, direction: str, rnd: int, items: list[dict], node: Any, lm: Any, pair: int) -> list[dict]:
        """Filter the verified-correct candidates; remember the choice for the reward."""
        _check_direction(direction)
        t0 = time.perf_counter()
        cands = [it for it in items if it.get("correct", True) and it.get("steps_ok", True)]
        prefix = self._prefix(direction, pair)
        pending = self._pending_path(node, direction, pair)
        node.log_metric(prefix + "candidates", len(cands))
        if not cands:
            pending.unlink(missing_ok=True)
            node.log_metric(prefix + "selected", 0)
            _add_seconds(node, prefix + "filter_seconds", time.perf_counter() - t0)
            return []
        filt = self._load_filter(node, direction, pair)
        hidden, nll, ntok = self._features(lm, cands, hidden=filt.kind == "lada")
        ctx = build_contexts(hidden, nll, cands, ntok)
        fcfg = filt.cfg
        g = torch.Generator().manual_seed(fcfg.seed * 1009 + rnd)
        idx = filt.select(ctx, fcfg.budget_for(len(cands)), g)
        chosen = [cands[i] for i in idx]
        self._save_filter(node, direction, pair, filt)
        torch.save({"rnd": rnd, "prompts": [it["prompt"] for it in chosen], "texts": [it["text"] for it in chosen],
                    "contexts": ctx[idx].clone(), "nll_before": nll[idx].clone()}, pending)
        diag = filt.diagnostics()
        node.log_metric(prefix + "selected", len(chosen))
        if "mean_predicted_reward" in diag:
            node.log_metric(prefix + "predicted_reward", diag["mean_predicted_reward"])
        node.log_metric(prefix + "cold_start", diag.get("cold_start", 0.0))
        if chosen:
            node.log_metric(prefix + "selected_steps", float(ctx[idx, -2].mean()))
            node.log_metric(prefix + "selected_nll", float(nll[idx].mean()))
        node.log_metric(prefix + "candidates_nll", float(nll.mean()))
        domains = {ex.id: ex.domain for ex in getattr(node, "public", [])}
        for what, group in (("candidates", cands), ("selected", chosen)):
            for name, share in _domain_shares(domains, group).items():
                node.log_metric(f"{prefix}{what}_share_{name}", share)
        _add_seconds(node, prefix + "filter_seconds", time.perf_counter() - t0)
        return chosen

    def extra_loss(self, direction: str, rnd: int, items: list[dict], node: Any, lm: Any,
                   pair: int) -> Callable[[int], Tensor] | None:
        """lambda_ * contrastive loss on minibatches of (y+ = selected path, y- = the
        receiver's own path); reference log-probs are computed here, before training."""
        _check_direction(direction)
        if self.opts.distill == "sft" or self.opts.lambda_ == 0 or not items:
            return None
        from lada.models.scoring import sequence_logprobs

        own = self.own_paths(direction, rnd, node, lm, sorted({it["example_id"] for it in items}))
        triples = [(it["prompt"], it["text"], neg) for it in items
                   if (neg := _pick_negative(own.get(it["example_id"], []), it["text"])) is not None]
        prefix = self._prefix(direction, pair)
        node.log_metric(prefix + "pairs", len(triples))
        if not triples:
            return None
        prompts = [p for p, _, _ in triples]
        pos = [y for _, y, _ in triples]
        neg = [y for _, _, y in triples]
        bs, maxlen = self.opts.score_batch_size, self._max_length()
        ref_pos, n_pos = sequence_logprobs(lm, prompts, pos, batch_size=bs, max_length=maxlen)
        ref_neg, n_neg = sequence_logprobs(lm, prompts, neg, batch_size=bs, max_length=maxlen)
        node.log_metric(prefix + "ref_margin_per_token",
                        float((ref_pos / n_pos.clamp_min(1) - ref_neg / n_neg.clamp_min(1)).mean()))
        gen = torch.Generator().manual_seed(int(node.seed) * 7 + rnd * 131 + pair)
        opts = self.opts
        queue: list[int] = []

        def loss(step: int) -> Tensor:
            nonlocal queue
            while len(queue) < min(opts.pair_batch, len(triples)):
                queue += torch.randperm(len(triples), generator=gen).tolist()
            idx, queue = queue[:opts.pair_batch], queue[opts.pair_batch:]
            b = len(idx)
            lp, _ = sequence_logprobs(lm, [prompts[i] for i in idx] * 2, [pos[i] for i in idx] + [neg[i] for i in idx],
                                      batch_size=2 * b, grad=True, max_length=maxlen)
            dev = lp.device
            sel = torch.tensor(idx)
            return opts.lambda_ * contrastive_loss(
                lp[:b], lp[b:], ref_pos[sel].to(dev), ref_neg[sel].to(dev), beta=opts.beta,
                pos_len=n_pos[sel].to(dev), neg_len=n_neg[sel].to(dev), length_normalize=opts.length_normalize)

        return loss

    def after_update(self, direction: str, rnd: int, items: list[dict], node: Any, lm: Any, pair: int) -> None:
        """Reward each selected path by the receiver's gain in per-token likelihood;
        the pair's filter learns from it."""
        _check_direction(direction)
        t0 = time.perf_counter()
        path = self._pending_path(node, direction, pair)
        if not path.exists():
            return
        pending = torch.load(path, weights_only=True)
        path.unlink()
        if pending["rnd"] != rnd or not pending["texts"]:
            return
        _, nll_after, _ = receiver_features(lm, pending["prompts"], pending["texts"], self.opts.score_batch_size,
                                            self._max_length(), hidden=False)
        rewards = learning_reward(pending["nll_before"], nll_after, self.opts.reward)
        filt = self._load_filter(node, direction, pair)
        filt.update(pending["contexts"], rewards)
        self._save_filter(node, direction, pair, filt)
        prefix = self._prefix(direction, pair)
        node.log_metric(prefix + "reward", float(rewards.mean()))
        node.log_metric(prefix + "nll_after", float(nll_after.mean()))
        _add_seconds(node, prefix + "filter_seconds", time.perf_counter() - t0)

    # ---- the receiver's own paths (y- and novelty)
    def own_paths(self, direction: str, rnd: int, node: Any, lm: Any,
                  example_ids: list[str]) -> dict[str, list[tuple[str, bool]]]:
        """The receiver's sampled paths (with verification) for each question, sampled
        once per direction and round and shared by every pair."""
        from lada.data.answers import verify_path
        from lada.data.records import example_prompt
        from lada.models.generation import sample_paths

        cache = self._own_paths.setdefault((direction, rnd), {})
        by_id = {ex.id: ex for ex in getattr(node, "public", [])}
        todo = [i for i in example_ids if i not in cache]
        missing = [i for i in todo if i not in by_id]
        if missing:
            raise KeyError(f"lada plug-in: example id(s) {missing[:3]} are not in the node's public set")
        if todo:
            exs = [by_id[i] for i in todo]
            seed = int(node.seed) * 13 + rnd * 7919 + DIRECTIONS.index(direction)
            texts = sample_paths(lm, [example_prompt(ex) for ex in exs], self.opts.negative_paths,
                                 self.cfg.generation, seed)
            for ex, paths in zip(exs, texts):
                cache[ex.id] = [(t, verify_path(t, ex)) for t in paths]
        return {i: cache[i] for i in example_ids}

    # ---- the upward phase (hosts without SLM -> LLM transfer)
    def _adds_upward(self) -> bool:
        if not self.opts.upward:
            return False
        from lada.hosts import HOSTS, _resolve

        name = self.cfg.host_name
        if name == "standalone":  # no collaboration at all: nothing to plug into
            return False
        return not getattr(_resolve(HOSTS, name, "host", "[host].name"), "transfers_up", False)

    def phases(self, rnd: int) -> list[Phase]:
        return [UP_PHASE] if self._adds_upward() else []

    def server_send(self, phase: str, rnd: int, server, client_ids: list[int]) -> dict[int, Payload]:
        if phase != UP_PHASE.name:
            return super().server_send(phase, rnd, server, client_ids)
        n = self.opts.up_questions
        if n <= 0 or n >= len(server.public):
            return {k: {"all_public": True} for k in client_ids}
        g = torch.Generator().manual_seed(int(server.seed) * 17 + rnd)
        ids = [server.public[i].id for i in torch.randperm(len(server.public), generator=g)[:n].tolist()]
        return {k: {"example_ids": list(ids)} for k in client_ids}

    def client_handle(self, phase: str, rnd: int, payload: Payload, client) -> Payload:
        if phase != UP_PHASE.name:
            return super().client_handle(phase, rnd, payload, client)
        from lada.hosts.common import items_to_payload, sample_verified_paths

        if payload.get("all_public"):
            exs = list(client.public)
        else:
            by_id = {ex.id: ex for ex in client.public}
            unknown = [i for i in payload.get("example_ids", []) if i not in by_id]
            if unknown:
                raise KeyError(f"lada_up payload names unknown public example id(s) {unknown[:3]}")
            exs = [by_id[i] for i in payload.get("example_ids", [])]
        items = sample_verified_paths(self.cfg, client.model(), exs, seed=int(client.seed) + 7919 * rnd)
        client.log_metric("lada_up_sent", len(items))
        return items_to_payload(items)

    def server_receive(self, phase: str, rnd: int, replies: dict[int, Payload], server) -> None:
        if phase != UP_PHASE.name:
            return super().server_receive(phase, rnd, replies, server)
        from lada.hosts.common import items_from_payload
        from lada.models.training import train_steps

        lm = server.model()
        received = {k: items_from_payload(replies[k], server.public) for k in sorted(replies)}
        qids = sorted({it["example_id"] for items in received.values() for it in items})
        own = self.own_paths("up", rnd, server, lm, qids)
        solved = {q for q, paths in own.items() if any(ok for _, ok in paths)}
        server.log_metric("lada_up_llm_solved", len(solved))
        chosen: dict[int, list[dict]] = {}
        extras: list[Callable[[int], Tensor]] = []
        for k, items in received.items():
            cands = [it for it in items if not (self.opts.up_novel_only and it["example_id"] in solved)]
            chosen[k] = self.select("up", rnd, cands, server, lm, k)
            extra = self.extra_loss("up", rnd, chosen[k], server, lm, k)
            if extra is not None:
                extras.append(extra)
        pairs = [(it["prompt"], it["text"]) for k in chosen for it in chosen[k]]
        replay = _replay_pairs(getattr(server, "train_set", []), round(self.opts.up_replay * len(pairs)),
                               seed=int(server.seed) * 31 + rnd)
        steps = self.opts.server_steps or self.cfg.train.server_steps
        # A few dozen paths: a full round of steps would be a dozen epochs of memorising them.
        steps = min(steps, math.ceil(self.opts.up_max_epochs * len(pairs + replay) / self.cfg.train.batch_size))
        if not pairs or steps <= 0:
            for k in chosen:
                self._pending_path(server, "up", k).unlink(missing_ok=True)
            server.log_metric("lada_up_trained", 0)
            return

        def combined(step: int) -> Tensor | None:
            if not extras:
                return None
            return sum(f(step) for f in extras) / len(extras)

        stats = train_steps(lm, pairs + replay, steps, self.cfg.train, seed=int(server.seed) + rnd,
                            extra_loss=combined if extras else None, desc="llm lada_up")
        for k in chosen:
            self.after_update("up", rnd, chosen[k], server, lm, k)
        server.save_model(lm)
        server.log_metric("lada_up_trained", len(pairs))
        server.log_metric("lada_up_train_loss", stats["loss"])


def _pick_negative(paths: list[tuple[str, bool]], positive: str) -> str | None:
    """The receiver's own path for y-: a wrong (unverified) one, or None. A correct own
    path is never a negative: pushing its likelihood down would unteach the receiver
    what it already gets right (on the default testbed that cost the LLM 10 points in
    one round), so such a question only gets the SFT part."""
    wrong = [t for t, ok in paths if not ok and t != positive]
    return wrong[0] if wrong else None


def _replay_pairs(examples: list, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` of the LLM's own training examples, drawn afresh each round. The upward
    transfer is a few dozen paths; training on them alone for a round's steps makes the
    LLM forget its general reasoning, as a client would forget without its private data."""
    if n <= 0 or not examples:
        return []
    from lada.data.records import example_prompt, example_target

    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [(example_prompt(examples[i]), example_target(examples[i])) for i in idx]


def _domain_shares(domains: dict[str, str], chosen: list[dict]) -> dict[str, float]:
    """Share of ``chosen`` per domain, given the public questions' ``{id: domain}``
    (empty when the public set has one domain): shows whether a filter keeps to or
    strays from what the receiver is tested on."""
    names = sorted(set(domains.values()))
    if len(names) < 2 or not chosen:
        return {}
    picked = [domains.get(it["example_id"]) for it in chosen]
    return {d: picked.count(d) / len(picked) for d in names}


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"lada plug-in: direction must be one of {DIRECTIONS}, got {direction!r}")


def _add_seconds(node: Any, name: str, seconds: float) -> None:
    """Accumulate the filter's own time (contexts, selection, reward, bandit training)
    over a round, so its overhead can be set against the round's seconds."""
    metrics = getattr(node, "state", {}).get("metrics", {})
    node.log_metric(name, float(metrics.get(name, 0.0)) + seconds)
