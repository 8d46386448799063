"""The LaDa plug-in: a learnability-aware data filter per (LLM, SLM_k) pair and
direction, and contrastive reasoning distillation, on top of any host.

The same algorithm on every host. A host opens one transfer per pair and direction
(``lada.protocol.host``); the candidates are always verified reasoning paths written by
the *sender* (LLM paths downward, SLM paths upward):

    enter   keep verified candidates; compute each one's context with the receiver;
            the pair's filter (read once from the receiver's workspace) selects; for the
            contrastive term, sample the receiver's own paths for the selected questions
            (y- = a wrong one) and take the reference log-probs of (y+, y-)
    body    the host trains the receiver on its usual data plus the selected paths,
            adding ``t.loss`` = lambda_ * L_cd at every step
    exit    reward each selected path (``[plugin] reward``: the receiver's gain in
            per-token likelihood of the path, its share of the gap, the paper's set-level
            form, or the receiver's gain on its own held-out data); the filter learns
            from it and is written back once

Nothing is kept on disk between enter and exit. Where the host's own exchange is not
reasoning paths (logits, adapters), the plug-in's paths ride beside it
(``paths_to_send`` / ``paths_received``), under keys the driver counts apart.

The plug-in sees a node only through ``lada.protocol.host.PluginNode``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from lada.data.records import example_prompt, example_target
from lada.data.answers import verify_path
from lada.models.generation import sample_paths
from lada.models.scoring import sequence_logprobs
from lada.models.training import IGNORE, collate, encode_pairs, index_batches
from lada.plugin.filter import DataFilter, make_filter
from lada.plugin.losses import contrastive_loss
from lada.plugin.options import REWARDS, FilterConfig, LadaConfig
from lada.protocol.host import DIRECTIONS, PLUGIN_PREFIX, LossFn, Plugin, PluginNode, Transfer
from lada.protocol.paths import Candidate, paths_from_payload, paths_to_payload, sample_paths_verified
from lada.protocol.payload import Payload
from lada.timing import timed, timed_fn

# The scalar features appended to the receiver's mean-pooled hidden state, in order.
# FilterConfig.nll_column = -4 points at the first one.
CONTEXT_SCALARS = ("receiver_nll_per_token", "sender_logprob_per_token", "steps", "tokens")


def learning_reward(nll_before: Tensor, nll_after: Tensor, kind: str = "gain") -> Tensor:
    """Per-sample reward from the receiver's per-token NLL of a path before and after
    the transfer's training, in geometric-mean token probability p = exp(-nll):

    gain      p_after - p_before. Bounded by the headroom 1 - p_before, so it favours
              paths the receiver finds hardest; where the candidates mix domains that
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
    raise ValueError(f"learning_reward: kind must be 'gain' or 'relative', got {kind!r}")


def paper_reward(nll_before: Tensor, nll_after: Tensor, previous_sum: float | None) -> tuple[Tensor, float]:
    """The set-level form reported for LaDa (arXiv 2602.18749): the sum of exp(-loss)
    over the selected set, compared with the previous round's, the difference shared
    equally by the selected samples.

    ``S_t = sum_i exp(-nll_after_i)`` over this round's selection (per-token NLL of the
    receiver on each selected path, after the transfer's training); the difference is
    ``S_t - S_{t-1}`` with ``S_{t-1}`` the pair's previous set sum, or, when there is none
    (round 1), the same set before training ``sum_i exp(-nll_before_i)``. Every selected
    sample gets ``(S_t - S_{t-1}) / |A_t|``. Returns (rewards, S_t).
    """
    n = len(nll_after)
    if n == 0:
        return torch.zeros(0), 0.0
    s_now = float(torch.exp(-nll_after).sum())
    s_prev = float(torch.exp(-nll_before).sum()) if previous_sum is None else float(previous_sum)
    return torch.full((n,), (s_now - s_prev) / n), s_now


def attribute_gain(gain: float, n: int, alignment: Tensor | None = None) -> Tensor:
    """Split a set's measured gain over its ``n`` samples so that the rewards sum to ``gain``.

    ``alignment`` None: equal shares ``gain / n``. Otherwise (one value per sample, e.g.
    the cosine between its gradient and the validation gradient) each share moves by
    the sample's alignment: ``r_i = gain / n + |gain| / n * (c_i - mean(c))``. A sample
    better aligned with what the receiver is measured on gets more of a gain and less of
    a loss; the deviations sum to zero.
    """
    if n == 0:
        return torch.zeros(0)
    share = gain / n
    if alignment is None:
        return torch.full((n,), share)
    if len(alignment) != n:
        raise ValueError(f"attribute_gain: {len(alignment)} alignments for {n} samples")
    c = alignment.float()
    return share + abs(share) * (c - c.mean())


def gold_pairs(examples) -> tuple[list[str], list[str]]:
    return [example_prompt(ex) for ex in examples], [example_target(ex) for ex in examples]


def validation_likelihood(lm, examples, batch_size: int = 16, max_length: int = 256) -> float:
    """The receiver's mean per-token likelihood ``exp(-nll)`` of the gold rationales of
    ``examples`` (answer included): how well it models what it is measured on."""
    prompts, texts = gold_pairs(examples)
    _, nll, _ = receiver_features(lm, prompts, texts, batch_size, max_length, hidden=False)
    return float(torch.exp(-nll).mean()) if len(nll) else float("nan")


@torch.no_grad()
def head_gradient_alignment(lm, prompts: list[str], texts: list[str], val_prompts: list[str], val_texts: list[str],
                            batch_size: int = 16, max_length: int = 256) -> Tensor:
    """Cosine between each sample's gradient and the validation gradient, taken with
    respect to the output projection (LM head) only, at the current weights.

    For a sample with head inputs ``h_t`` and prediction errors ``e_t = softmax_t - onehot_t``
    at its target positions, the gradient of its mean token NLL is
    ``G = (1/T) sum_t e_t h_t^T``, exactly, from one forward pass (no backward). A
    first-order step on sample i changes the validation loss by ``-lr <G_i, G_val>``, so a
    positive cosine means "training on it helps what the receiver is measured on". The
    head gradient is the cheap part of the full gradient (TracIn-style last-layer
    influence); it is computed the same way for LoRA models, whose heads do not train.
    """
    head = lm.model.get_output_embeddings()
    if head is None:
        raise ValueError("head_gradient_alignment: the model has no output embedding layer")
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))

    def errors(ps: list[str], ts: list[str]):
        """(inputs [T, H], errors [T, V]) of each example's target positions."""
        encoded = encode_pairs(lm.tokenizer, list(zip(ps, ts)), max_length)
        out = []
        with _eval_mode(lm.model):
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                batch = collate(chunk, lm.tokenizer.pad_token_id, lm.device)
                captured.clear()
                logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                h = captured[-1][:, :-1].float()
                labels = batch["labels"][:, 1:]
                probs = logits[:, :-1].float().softmax(-1)
                for j in range(len(chunk)):
                    keep = labels[j] != IGNORE
                    e = probs[j][keep]
                    e[torch.arange(len(e)), labels[j][keep]] -= 1.0
                    out.append((h[j][keep], e))
        return out

    try:
        val = errors(val_prompts, val_texts)
        sel = errors(prompts, texts)
    finally:
        hook.remove()
    if not val or not sel:
        return torch.zeros(len(sel))
    g_val = sum(e.T @ hh / max(1, len(e)) for hh, e in val) / len(val)  # [V, H]
    g_val_norm = g_val.norm().clamp_min(1e-12)
    cos = torch.zeros(len(sel))
    for i, (hh, e) in enumerate(sel):
        t = max(1, len(e))
        dot = float((e * (hh @ g_val.T)).sum()) / t
        # ||(1/T) sum_t e_t h_t^T||_F^2 = (1/T^2) sum_{t,s} (e_t . e_s)(h_t . h_s)
        norm = math.sqrt(max(0.0, float(((e @ e.T) * (hh @ hh.T)).sum()))) / t
        cos[i] = dot / (max(norm, 1e-12) * float(g_val_norm))
    return cos


# ----------------------------------------------------------------------------- contexts

@timed_fn("scoring")
@torch.no_grad()
def receiver_features(lm, prompts: list[str], texts: list[str], batch_size: int = 16, max_length: int = 256,
                      hidden: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """One forward pass of the receiver over ``prompt + path``.

    Returns (mean-pooled last hidden state over all real tokens [N, H] or None,
    NLL per target token [N], target tokens incl. EOS [N]); CPU float32. Tokenised
    exactly as training does, so the NLL is the quantity training lowers.
    """
    n = len(prompts)
    if n != len(texts):
        raise ValueError(f"receiver_features: {n} prompts but {len(texts)} texts")
    if n == 0:
        return (torch.zeros(0, 0) if hidden else None), torch.zeros(0), torch.zeros(0)
    encoded = encode_pairs(lm.tokenizer, list(zip(prompts, texts)), max_length)
    order = sorted(range(n), key=lambda i: len(encoded[i]["input_ids"]))
    pooled: list[Tensor | None] = [None] * n
    nll, ntok = torch.zeros(n), torch.zeros(n)
    with _eval_mode(lm.model):
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = collate([encoded[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
            out = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
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
    return (torch.stack(pooled) if hidden else None), nll, ntok  # type: ignore[arg-type]


def build_contexts(hidden: Tensor | None, nll: Tensor, cands: list[Candidate], ntok: Tensor) -> Tensor:
    """[mean hidden | receiver NLL/token, sender log-prob/token, steps, tokens] per candidate."""
    sender = torch.tensor([c.sender_logprob / max(1, c.n_tokens) for c in cands])
    steps = torch.tensor([float(c.steps) for c in cands])
    scalars = torch.stack([nll, sender, steps, ntok], dim=1)
    return scalars if hidden is None else torch.cat([hidden, scalars], dim=1)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (eval mode) for the duration, whatever the caller's mode. The
    contrastive term takes its reference and its policy log-probs both this way, so the
    DPO margin is exactly 0 before the first update, with or without dropout."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the plug-in

class LadaPlugin(Plugin):
    name = "lada"
    config_cls = LadaConfig

    def __init__(self, cfg, options: LadaConfig | None = None) -> None:
        super().__init__(cfg, options if options is not None else LadaConfig())
        self.opts: LadaConfig = self.options
        # (direction, rnd, receiver workspace) -> {question id: [(path text, verified)]}:
        # the receiver's own paths, sampled once per question and round (y-), shared by
        # every pair feeding that receiver.
        self._own_paths: dict[tuple[str, int, str], dict[str, list[tuple[str, bool]]]] = {}

    # ---- filter state: read once when a transfer opens, written once when it closes
    def _filter_cfg(self, direction: str, pair: int) -> FilterConfig:
        f = self.opts.filter
        seed = f.seed + 1000 * int(getattr(self.cfg, "seed", 0)) + 10 * pair + DIRECTIONS.index(direction)
        return dataclasses.replace(f, seed=seed)

    @staticmethod
    def filter_path(node: PluginNode, direction: str, pair: int) -> Path:
        return Path(node.workspace) / f"filter-{direction}-{pair}.pt"

    def _load_filter(self, node: PluginNode, direction: str, pair: int) -> DataFilter:
        filt = make_filter(self._filter_cfg(direction, pair))
        path = self.filter_path(node, direction, pair)
        if path.exists():
            filt.load_state_dict(torch.load(path, weights_only=True))
        return filt

    def _save_filter(self, node: PluginNode, direction: str, pair: int, filt: DataFilter) -> None:
        path = self.filter_path(node, direction, pair)
        tmp = path.with_suffix(".tmp")
        torch.save(filt.state_dict(), tmp)
        tmp.replace(path)

    @staticmethod
    def _prefix(direction: str, pair: int) -> str:
        # A client's row is its own, so "down" needs no pair; the server's row holds every pair.
        return "lada_down_" if direction == "down" else f"lada_up{pair}_"

    def _max_length(self) -> int:
        return int(self.cfg.train.max_length)

    def _features(self, lm, cands: list[Candidate], hidden: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        return receiver_features(lm, [c.prompt for c in cands], [c.text for c in cands],
                                 self.opts.score_batch_size, self._max_length(), hidden)

    # ---- the transfer lifecycle
    @contextlib.contextmanager
    def transfer(self, direction: str, rnd: int, pair: int, node: PluginNode, lm: Any,
                 candidates: list[Candidate]) -> Iterator[Transfer]:
        _check_direction(direction)
        # lada.timing: the filter's own work (contexts aside, which are scoring; the
        # receiver's own paths, which are sampling) is the "filter" category.
        with timed("filter"):
            t0 = time.perf_counter()
            prefix = self._prefix(direction, pair)
            cands = [c for c in candidates if c.verified]
            val = self._validation(node)
            if val:  # the LLM's held-out public questions are never candidates
                held = {ex.id for ex in val}
                kept = [c for c in cands if c.question_id not in held]
                node.log_metric(prefix + "val_excluded", len(cands) - len(kept))
                cands = kept
            node.log_metric(prefix + "candidates", len(cands))
            filt = self._load_filter(node, direction, pair)
            idx: list[int] = []
            if cands:
                hidden, nll, _ntok = self._features(lm, cands, hidden=filt.kind == "lada")
                ctx = build_contexts(hidden, nll, cands, _ntok)
                g = torch.Generator().manual_seed(filt.cfg.seed * 1009 + rnd)
                idx = filt.select(ctx, filt.cfg.budget_for(len(cands)), g)
                predicted = filt.decision_predictions()  # EE-Net: f1 at decision time, kept for f2's target
                self._log_selection(node, prefix, filt, cands, idx, ctx, nll)
            chosen = [cands[i] for i in idx]
            loss = self._contrastive(direction, rnd, pair, node, lm, chosen)
            before = self._receiver_before(lm, val, chosen) if val and chosen else None
            node.add_metric(prefix + "filter_seconds", time.perf_counter() - t0)
            t = Transfer(direction, pair, chosen, loss, len(cands))
        yield t  # the host trains here; an exception leaves the filter as it was
        with timed("filter"):
            t1 = time.perf_counter()
            if chosen:
                _, nll_after, _ = receiver_features(lm, [c.prompt for c in chosen], [c.text for c in chosen],
                                                    self.opts.score_batch_size, self._max_length(), hidden=False)
                rewards = self._rewards(rnd, direction, pair, node, lm, prefix, nll[idx], nll_after, val, before)
                filt.update(ctx[idx], rewards, predicted)
                node.log_metric(prefix + "reward", float(rewards.mean()))
                node.log_metric(prefix + "nll_after", float(nll_after.mean()))
            self._save_filter(node, direction, pair, filt)
            node.add_metric(prefix + "filter_seconds", time.perf_counter() - t1)

    # ---- rewards
    def _validation(self, node: PluginNode) -> list:
        """The receiver's held-out examples (reward = "receiver"), else []."""
        if self.opts.reward != "receiver":
            return []
        held = getattr(node, "held_out", None)
        if not held:
            raise ValueError(f"lada plug-in: reward = 'receiver' needs held-out examples on the receiver's node "
                             f"({getattr(node, 'participant', node)!r} has none)")
        return list(held)

    def _receiver_before(self, lm: Any, val: list, chosen: list[Candidate]) -> tuple[float, Tensor | None]:
        """Before training: the receiver's validation likelihood and, for gradient
        attribution, each selected path's alignment with the validation gradient."""
        bs, maxlen = self.opts.score_batch_size, self._max_length()
        p = validation_likelihood(lm, val, bs, maxlen)
        align = None
        if self.opts.reward_attribution == "gradient":
            vp, vt = gold_pairs(val)
            align = head_gradient_alignment(lm, [c.prompt for c in chosen], [c.text for c in chosen], vp, vt, bs,
                                            maxlen)
        return p, align

    def _rewards(self, rnd: int, direction: str, pair: int, node: PluginNode, lm: Any, prefix: str,
                 nll_before: Tensor, nll_after: Tensor, val: list,
                 before: tuple[float, Tensor | None] | None) -> Tensor:
        kind = self.opts.reward
        if kind in ("gain", "relative"):
            return learning_reward(nll_before, nll_after, kind)
        if kind == "paper":
            path = Path(node.workspace) / f"reward-{direction}-{pair}.json"
            prev = json.loads(path.read_text())["set_sum"] if path.exists() else None
            rewards, s_now = paper_reward(nll_before, nll_after, prev)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"round": rnd, "set_sum": s_now}))
            tmp.replace(path)
            node.log_metric(prefix + "set_sum", s_now)
            return rewards
        if kind == "receiver":
            assert before is not None
            p_before, align = before
            p_after = validation_likelihood(lm, val, self.opts.score_batch_size, self._max_length())
            node.log_metric(prefix + "val_before", p_before)
            node.log_metric(prefix + "val_after", p_after)
            if align is not None:
                node.log_metric(prefix + "val_alignment", float(align.mean()))
            return attribute_gain(p_after - p_before, len(nll_after), align)
        raise ValueError(f"lada plug-in: unknown reward {kind!r}; expected one of {REWARDS}")

    def _log_selection(self, node: PluginNode, prefix: str, filt: DataFilter, cands: list[Candidate],
                       idx: list[int], ctx: Tensor, nll: Tensor) -> None:
        chosen = [cands[i] for i in idx]
        diag = filt.diagnostics()
        node.log_metric(prefix + "selected", len(chosen))
        if "mean_predicted_reward" in diag:
            node.log_metric(prefix + "predicted_reward", diag["mean_predicted_reward"])
        node.log_metric(prefix + "cold_start", diag.get("cold_start", 0.0))
        if chosen:
            node.log_metric(prefix + "selected_steps", float(ctx[idx, -2].mean()))
            node.log_metric(prefix + "selected_nll", float(nll[idx].mean()))
        node.log_metric(prefix + "candidates_nll", float(nll.mean()))
        domains = {ex.id: ex.domain for ex in node.public}
        for what, group in (("candidates", cands), ("selected", chosen)):
            for name, share in _domain_shares(domains, group).items():
                node.log_metric(f"{prefix}{what}_share_{name}", share)

    def _contrastive(self, direction: str, rnd: int, pair: int, node: PluginNode, lm: Any,
                     chosen: list[Candidate]) -> LossFn | None:
        """lambda_ * contrastive loss on minibatches of (y+ = selected sender path, y- =
        the receiver's own wrong path); reference log-probs are taken now, before training."""
        if self.opts.distill == "sft" or self.opts.lambda_ == 0 or not chosen:
            return None
        own = self.own_paths(direction, rnd, node, lm, sorted({c.question_id for c in chosen}))
        triples = [(c.prompt, c.text, neg) for c in chosen
                   if (neg := _pick_negative(own.get(c.question_id, []), c.text)) is not None]
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
        opts = self.opts
        # y+ and y- of a pair share a forward batch, so a pair's length is its longer path's
        lengths = ([int(max(a, b)) for a, b in zip(n_pos.tolist(), n_neg.tolist())]
                   if self.cfg.train.length_buckets else None)
        order = index_batches(len(triples), min(opts.pair_batch, len(triples)),
                              int(node.seed) * 7 + rnd * 131 + pair, lengths)

        def loss(step: int) -> Tensor:
            idx = next(order)
            b = len(idx)
            with _eval_mode(lm.model):  # same mode as the reference (no dropout), gradients kept
                lp, _ = sequence_logprobs(lm, [prompts[i] for i in idx] * 2,
                                          [pos[i] for i in idx] + [neg[i] for i in idx],
                                          batch_size=2 * b, grad=True, max_length=maxlen)
            dev = lp.device
            sel = torch.tensor(idx)
            return opts.lambda_ * contrastive_loss(
                lp[:b], lp[b:], ref_pos[sel].to(dev), ref_neg[sel].to(dev), beta=opts.beta,
                pos_len=n_pos[sel].to(dev), neg_len=n_neg[sel].to(dev), length_normalize=opts.length_normalize)

        return loss

    def own_paths(self, direction: str, rnd: int, node: PluginNode, lm: Any,
                  question_ids: list[str]) -> dict[str, list[tuple[str, bool]]]:
        """The receiver's sampled paths (with verification) for each question, sampled
        once per direction and round and shared by every pair."""
        cache = self._own_paths.setdefault((direction, rnd, str(node.workspace)), {})
        by_id = {ex.id: ex for ex in node.public}
        todo = [i for i in question_ids if i not in cache]
        missing = [i for i in todo if i not in by_id]
        if missing:
            raise KeyError(f"lada plug-in: question id(s) {missing[:3]} are not in the node's public set")
        if todo:
            exs = [by_id[i] for i in todo]
            seed = int(node.seed) * 13 + rnd * 7919 + DIRECTIONS.index(direction)
            texts = sample_paths(lm, [example_prompt(ex) for ex in exs], self.opts.negative_paths,
                                 self.cfg.generation, seed)
            for ex, paths in zip(exs, texts):
                cache[ex.id] = [(t, verify_path(t, ex)) for t in paths]
        return {i: cache[i] for i in question_ids}

    # ---- paths beside a host's own exchange
    def _rides_beside(self, direction: str) -> bool:
        return direction in self.caps.directions and direction not in self.caps.path_directions

    def paths_to_send(self, direction: str, rnd: int, node: Any) -> Payload:
        """The sender's verified paths on every public question, for hosts whose own
        exchange in ``direction`` is not paths (nothing otherwise)."""
        _check_direction(direction)
        if not self._rides_beside(direction):
            return {}
        seed = int(node.seed) + 7919 * rnd + 101 * DIRECTIONS.index(direction)
        cands = sample_paths_verified(self.cfg, node.model(), list(node.public), seed=seed)
        node.log_metric(f"lada_{direction}_sent", len(cands))
        return paths_to_payload(cands, prefix=PLUGIN_PREFIX)

    def paths_received(self, direction: str, payload: Payload, node: PluginNode) -> list[Candidate]:
        _check_direction(direction)
        if not self._rides_beside(direction):
            return []
        return paths_from_payload(payload, node.public, prefix=PLUGIN_PREFIX, where=f"lada {direction} paths")


def _pick_negative(paths: list[tuple[str, bool]], positive: str) -> str | None:
    """The receiver's own path for y-: a wrong (unverified) one, or None. A correct own
    path is never a negative: pushing its likelihood down would unteach the receiver
    what it already gets right (on the default testbed that cost the LLM 10 points in
    one round), so such a question only gets the SFT part."""
    wrong = [t for t, ok in paths if not ok and t != positive]
    return wrong[0] if wrong else None


def _domain_shares(domains: dict[str, str], chosen: list[Candidate]) -> dict[str, float]:
    """Share of ``chosen`` per domain, given the public questions' ``{id: domain}``
    (empty when the public set has one domain): shows whether a filter keeps to or
    strays from what the receiver is tested on."""
    names = sorted(set(domains.values()))
    if len(names) < 2 or not chosen:
        return {}
    picked = [domains.get(c.question_id) for c in chosen]
    return {d: picked.count(d) / len(picked) for d in names}


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"lada plug-in: direction must be one of {DIRECTIONS}, got {direction!r}")
