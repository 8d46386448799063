"""FedMKT (Fan et al., arXiv 2406.02224): mutual knowledge transfer between a server
LLM and heterogeneous client SLMs through top-k next-token distributions on a public set.

Each round:

1. ``vocab`` (round 1 only): server and clients exchange their vocabularies (the bytes
   of every token) once; each receiver builds the minimum-edit-distance token mapping
   from the sender's vocabulary into its own (:mod:`lada.hosts.token_alignment`).
2. ``local_train``: every client fine-tunes its SLM on its private data.
3. ``client_logits``: every client sends its top-k next-token distributions (int32 ids,
   fp16 log-probs) over the gold target text of each public example, with the byte
   offset of each target token and its NLL of the gold text. The server maps them into
   its vocabulary, aligns positions by byte offset, and per example distils toward the
   distribution with the lowest cross-entropy on the gold text among its own and the
   clients' ("greater" selection). Loss: ``alpha * LM + (1 - alpha) * KD``.
4. ``server_logits``: the updated LLM's top-k distributions go down; each client maps,
   aligns and selects (its own vs the LLM's) the same way and trains with the same loss.

Each distillation is one plug-in transfer per (LLM, SLM_k) pair (``lada.protocol.host``).
FedMKT's own exchange is distributions, not reasoning paths, so a plug-in's paths ride
beside it: clients add theirs to the ``client_logits`` reply, the server adds the LLM's
to the ``server_logits`` message (keys ``lada/...``, bytes reported apart). The receiver
distils on the whole public set as the host does, and also trains (LM loss) on the
plug-in's selected paths, with the mean of the pairs' extra losses; the training budget
is ``[host] epochs`` passes (1, as the paper; 0: ``train.transfer_epochs``) over public
examples plus selected paths. As in the paper, every participant trains LoRA adapters
(``lora_r``, ``llm_lora_r``; docs/hosts.md, "Training form").

The distillation machinery here (:func:`compute_topk`, :func:`transfer_targets`,
:func:`distill`) is shared with FedCoLLM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from lada.data.records import Example, example_prompt, example_target
from lada.hosts.common import lora_model, path_pairs, private_pairs, transfer_steps
from lada.hosts.options import FedMKTConfig
from lada.hosts.token_alignment import Vocab, align_spans, build_token_mapping, map_topk, token_starts, vocab_of
from lada.models.training import IGNORE, collate, encode_pairs, index_batches, train_steps
from lada.protocol.host import Capabilities, Host, Phase, Transfer, mean_loss
from lada.protocol.node import cache_dir
from lada.protocol.payload import Payload

if TYPE_CHECKING:
    from lada.config import TrainConfig
    from lada.models.loading import LoadedModel
    from lada.protocol.node import Node
    from lada.protocol.paths import Candidate


# ----------------------------------------------------------------------------- top-k distributions

@dataclass
class Encoded:
    """One public example as a model sees it: ids/labels for training, and the byte
    span of every target position (the target tokens, then EOS) in the target text."""

    example_id: str
    input_ids: list[int]
    labels: list[int]
    starts: np.ndarray  # int32, one per target position
    gold: np.ndarray  # int64 target token ids, one per target position


def encode_examples(lm: "LoadedModel", vocab: Vocab, examples: list[Example], max_length: int) -> list[Encoded]:
    """Encode (prompt, gold target) exactly as training does, plus target byte offsets.

    EOS gets the offset just past the text, so the two sides' EOS positions align."""
    targets = [example_target(ex) for ex in examples]
    enc = encode_pairs(lm.tokenizer, [(example_prompt(ex), t) for ex, t in zip(examples, targets)], max_length)
    target_ids = lm.tokenizer(targets, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for ex, text, e, tids in zip(examples, targets, enc, target_ids):
        gold = np.array([x for x in e["labels"] if x != IGNORE], dtype=np.int64)
        starts, _ = token_starts(vocab, tids, text)
        starts = np.append(starts, len(text.encode("utf-8")))[: len(gold)].astype(np.int32)
        out.append(Encoded(ex.id, e["input_ids"], e["labels"], starts, gold))
    return out


@dataclass
class TopK:
    """Top-k next-token distributions of one model over the target positions of a list
    of examples, in wire form: positions of all examples are concatenated."""

    ids: list[str]
    lengths: np.ndarray  # int32 [N] target positions per example
    starts: np.ndarray  # int32 [T] byte offset of each position's token in the target text
    idx: np.ndarray  # int32 [T, k] token ids
    logp: np.ndarray  # float16 [T, k] log-probabilities
    nll: np.ndarray  # float32 [N] negative log-likelihood of the gold target (+ EOS)

    def to_payload(self) -> Payload:
        return {"tk_ids": list(self.ids), "tk_lengths": self.lengths, "tk_starts": self.starts,
                "tk_idx": self.idx, "tk_logp": self.logp, "tk_nll": self.nll}

    @classmethod
    def from_payload(cls, p: Payload, where: str = "payload") -> "TopK":
        missing = [k for k in ("tk_ids", "tk_lengths", "tk_starts", "tk_idx", "tk_logp", "tk_nll") if k not in p]
        if missing:
            raise KeyError(f"{where}: missing top-k field(s) {missing}")
        tk = cls(list(p["tk_ids"]), np.asarray(p["tk_lengths"]), np.asarray(p["tk_starts"]), np.asarray(p["tk_idx"]),
                 np.asarray(p["tk_logp"]), np.asarray(p["tk_nll"]))
        total = int(tk.lengths.sum())
        if not (len(tk.ids) == len(tk.lengths) == len(tk.nll)) or tk.idx.shape[0] != total \
                or tk.logp.shape != tk.idx.shape or len(tk.starts) != total:
            raise ValueError(f"{where}: inconsistent top-k shapes: {len(tk.ids)} ids, {len(tk.lengths)} lengths "
                             f"(sum {total}), starts {tk.starts.shape}, idx {tk.idx.shape}, logp {tk.logp.shape}")
        return tk

    def by_id(self) -> dict[str, slice]:
        ends = np.cumsum(self.lengths)
        return {i: slice(int(e - n), int(e)) for i, e, n in zip(self.ids, ends.tolist(), self.lengths.tolist())}

    def token_ce(self) -> np.ndarray:
        """Mean cross-entropy per target token of each example."""
        return self.nll / np.maximum(self.lengths, 1)


def compute_topk(lm: "LoadedModel", encoded: list[Encoded], k: int, batch_size: int, vocab_size: int) -> TopK:
    """Run the model over the encoded examples and keep, at each target position, the
    ``k`` most likely next tokens (ids below ``vocab_size``: padded embedding rows of
    the model that no token uses are never sent)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    idx_out: list[np.ndarray | None] = [None] * len(encoded)
    logp_out: list[np.ndarray | None] = [None] * len(encoded)
    nll = np.zeros(len(encoded), dtype=np.float32)
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                chunk = order[s:s + batch_size]
                batch = collate([{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels} for i in chunk],
                                lm.tokenizer.pad_token_id, lm.device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                keep = labels != IGNORE
                sel = logits[:, :-1][keep].float()
                if sel.shape[-1] > vocab_size:
                    sel[:, vocab_size:] = float("-inf")
                logp = sel.log_softmax(-1)
                gold = logp.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
                top_v, top_i = logp.topk(min(k, vocab_size), dim=-1)
                counts = keep.sum(1).tolist()
                for i, v, ix, g in zip(chunk, top_v.split(counts), top_i.split(counts), gold.split(counts)):
                    logp_out[i] = v.cpu().numpy().astype(np.float16)
                    idx_out[i] = ix.cpu().numpy().astype(np.int32)
                    nll[i] = -float(g.sum())
    finally:
        model.train(was_training)
    kk = min(k, vocab_size)
    return TopK([e.example_id for e in encoded], np.array([len(e.gold) for e in encoded], dtype=np.int32),
                np.concatenate([e.starts for e in encoded]).astype(np.int32) if encoded else np.zeros(0, np.int32),
                np.concatenate(idx_out).astype(np.int32) if encoded else np.zeros((0, kk), np.int32),
                np.concatenate(logp_out).astype(np.float16) if encoded else np.zeros((0, kk), np.float16), nll)


def _softmax(logp: np.ndarray, temperature: float) -> np.ndarray:
    z = logp.astype(np.float32) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def own_targets(tk: TopK, sl: slice, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """A model's own top-k distribution as a distillation target (renormalised over the k)."""
    return tk.idx[sl].astype(np.int64), _softmax(tk.logp[sl], temperature)


def transfer_targets(receiver: Encoded, sender: TopK, sl: slice, mapping: np.ndarray | None, dst_vocab_size: int,
                     temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sender's distributions moved onto the receiver's target positions.

    A receiver position takes the sender's distribution at the sender position whose
    token starts at the same byte (same conditioning text), mapped into the receiver's
    vocabulary. Positions where no sender token starts there get a one-hot target on
    the receiver's gold token (as FedMKT's reference code does for unaligned tokens).
    Returns ``(ids [n, k], probs [n, k], aligned mask [n])``.
    """
    s_starts = sender.starts[sl].astype(np.int64)
    s_ends = np.append(s_starts[1:], s_starts[-1] + 1) if len(s_starts) else s_starts
    r_starts = receiver.starts.astype(np.int64)
    j = align_spans(r_starts, s_starts, s_ends)
    jc = np.clip(j, 0, None)
    aligned = (j >= 0) & (s_starts[jc] == r_starts) if len(s_starts) else np.zeros(len(r_starts), dtype=bool)
    k = sender.idx.shape[1]
    ids = np.zeros((len(r_starts), k), dtype=np.int64)
    probs = np.zeros((len(r_starts), k), dtype=np.float32)
    ids[:, 0] = receiver.gold
    probs[:, 0] = 1.0
    if aligned.any():
        rows = sl.start + jc[aligned]
        p = _softmax(sender.logp[rows], temperature)
        src = sender.idx[rows]
        if mapping is None:
            d, q = src.astype(np.int64), p
        else:
            d, q = map_topk(src, p, mapping, dst_vocab_size)
        ids[aligned], probs[aligned] = d, q
    return ids, probs, aligned


def choose_teacher(own_ce: np.ndarray, other_ce: np.ndarray) -> np.ndarray:
    """FedMKT's "greater" rule: per example, the distribution whose model has the
    lowest cross-entropy on the gold text. ``other_ce`` is ``[n_others, N]`` with NaN
    where that sender's distribution is not a candidate. Returns 0 for "own", ``1 + m``
    for other sender ``m``; ties keep the earlier candidate (own first)."""
    own_ce = np.asarray(own_ce, dtype=np.float64)
    other = np.asarray(other_ce, dtype=np.float64).reshape(-1, len(own_ce))
    table = np.vstack([own_ce[None], np.where(np.isnan(other), np.inf, other)])
    return np.argmin(table, axis=0)


# ----------------------------------------------------------------------------- training

@dataclass
class DistillSample:
    enc: Encoded
    t_idx: np.ndarray | None  # [n, k] int64 target ids in the student's vocabulary (None: LM loss only)
    t_prob: np.ndarray | None  # [n, k] float32


def encode_paths(lm: "LoadedModel", pairs: list[tuple[str, str]], max_length: int) -> list[DistillSample]:
    """(prompt, path) pairs as LM-loss-only samples (a plug-in's selected paths)."""
    enc = encode_pairs(lm.tokenizer, pairs, max_length)
    return [DistillSample(Encoded("", e["input_ids"], e["labels"], np.zeros(0, np.int32), np.zeros(0, np.int64)),
                          None, None) for e in enc]


def distill(lm: "LoadedModel", samples: list[DistillSample], steps: int, train_cfg: "TrainConfig", seed: int,
            w_lm: float, w_kd: float, extra: Callable[[int], Any] | None = None, desc: str = "distill") -> dict:
    """``steps`` optimizer steps of ``w_lm * LM + w_kd * KD + extra`` on the samples;
    KD is the cross-entropy from each position's sparse target distribution to the
    student's next-token distribution (samples without targets get the LM loss only).
    Returns the loss parts (mean of the last 10 steps) and the training stats."""
    if not samples or steps <= 0:
        return {"lm_loss": float("nan"), "kd_loss": float("nan"), "extra_loss": float("nan"), "steps": 0}
    parts: dict[str, list[float]] = {"lm": [], "kd": [], "extra": []}
    bs = min(train_cfg.batch_size, len(samples))
    lengths = [len(s.enc.input_ids) for s in samples] if getattr(train_cfg, "length_buckets", False) else None
    order = index_batches(len(samples), bs, seed, lengths)

    def loss(step: int):
        chosen = [samples[i] for i in next(order)]
        batch = collate([{"input_ids": s.enc.input_ids, "labels": s.enc.labels} for s in chosen],
                        lm.tokenizer.pad_token_id, lm.device)
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logp = logits[:, :-1][keep].float().log_softmax(-1)
        lm_loss = torch.nn.functional.nll_loss(logp, labels[keep])
        total = w_lm * lm_loss
        with_targets = [s.t_idx is not None for s in chosen]
        if any(with_targets):
            rows = torch.from_numpy(np.repeat(np.array(with_targets), keep.sum(1).cpu().numpy())).to(lm.device)
            t_idx = torch.from_numpy(np.concatenate([s.t_idx for s in chosen if s.t_idx is not None])).to(lm.device)
            t_prob = torch.from_numpy(np.concatenate([s.t_prob for s in chosen if s.t_prob is not None])).to(lm.device)
            kd_logp = logp[rows]
            if t_idx.shape[0] != kd_logp.shape[0]:
                raise RuntimeError(f"distill: {t_idx.shape[0]} target rows for {kd_logp.shape[0]} student positions")
            kd = -(t_prob * kd_logp.gather(-1, t_idx)).sum(-1).mean()
            total = total + w_kd * kd
            parts["kd"].append(float(kd.detach()))
        if extra is not None and (x := extra(step)) is not None:
            total = total + x
            parts["extra"].append(float(x.detach()))
        parts["lm"].append(float(lm_loss.detach()))
        return total

    stats = train_steps(lm, [], steps, train_cfg, seed, extra_loss=loss, desc=desc)
    tail = lambda v: float(np.mean(v[-10:])) if v else float("nan")  # noqa: E731
    return {"lm_loss": tail(parts["lm"]), "kd_loss": tail(parts["kd"]), "extra_loss": tail(parts["extra"]), **stats}


def mapping_path(node: "Node", name: str) -> Path:
    return node.workspace / "token_maps" / f"{name}.npy"


def save_mapping(node: "Node", name: str, sender_vocab: Vocab, receiver_vocab: Vocab) -> np.ndarray:
    """Build (or reuse from the shared cache) and keep in the node's workspace the
    mapping from the sender's vocabulary into the receiver's."""
    m = build_token_mapping(sender_vocab, receiver_vocab, cache_dir=cache_dir(node.cfg) / "token_maps")
    path = mapping_path(node, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, m)
    return m


def load_mapping(node: "Node", name: str) -> np.ndarray:
    path = mapping_path(node, name)
    if not path.is_file():
        raise FileNotFoundError(f"{node.participant}: token mapping {path} is missing; the 'vocab' phase of round 1 "
                                "builds it")
    return np.load(path)


# ----------------------------------------------------------------------------- the host

def _ce(tk: TopK, metric: str) -> np.ndarray:
    return tk.token_ce() if metric == "token" else tk.nll.astype(np.float64)


class FedMKTHost(Host):
    name = "fedmkt"
    config_cls = FedMKTConfig
    capabilities = Capabilities(directions=frozenset({"down", "up"}))

    def phases(self, rnd: int) -> list[Phase]:
        first = [Phase("vocab", "query")] if rnd == 1 else []
        return first + [Phase("local_train", "train"), Phase("client_logits", "query"), Phase("server_logits", "train")]

    # ---- helpers shared by both sides
    def _topk(self, node: "Node", lm: "LoadedModel", vocab: Vocab) -> tuple[list[Encoded], TopK]:
        enc = encode_examples(lm, vocab, node.public, self.cfg.train.max_length)
        return enc, compute_topk(lm, enc, self.options.top_k, self.cfg.generation.batch_size, len(vocab))

    def _transfer(self, direction: str, rnd: int, node: "Node", lm: "LoadedModel", vocab: Vocab,
                  senders: dict[int, tuple[TopK, np.ndarray]], candidates: dict[int, list["Candidate"]],
                  seed: int) -> dict[str, float]:
        """Receive distributions from ``senders`` (pair -> (top-k, mapping into our
        vocabulary)), select a teacher per public example, and distil; one plug-in
        transfer per pair adds its selected paths and extra loss."""
        o = self.options
        enc, own = self._topk(node, lm, vocab)
        own_spans = own.by_id()
        pairs = sorted(senders)
        sender_spans = {p: senders[p][0].by_id() for p in pairs}
        other_ce = np.full((len(pairs), len(enc)), np.nan)
        for m, p in enumerate(pairs):
            ce = dict(zip(senders[p][0].ids, _ce(senders[p][0], o.metric).tolist()))
            for n, e in enumerate(enc):
                if e.example_id in sender_spans[p]:
                    other_ce[m, n] = ce[e.example_id]
        if o.selection == "greater":
            teacher = choose_teacher(_ce(own, o.metric), other_ce)
        else:  # always the other side's distribution (lowest CE among the senders)
            teacher = choose_teacher(np.full(len(enc), np.inf), other_ce)
        samples: list[DistillSample] = []
        aligned_share: list[float] = []
        n_other = 0
        for n, e in enumerate(enc):
            t = int(teacher[n])
            if t == 0 or np.isnan(other_ce[t - 1, n]):
                ids, probs = own_targets(own, own_spans[e.example_id], o.temperature)
            else:
                p = pairs[t - 1]
                tk, mapping = senders[p]
                ids, probs, aligned = transfer_targets(e, tk, sender_spans[p][e.example_id], mapping, len(vocab),
                                                       o.temperature)
                aligned_share.append(float(aligned.mean()) if len(aligned) else 0.0)
                n_other += 1
            samples.append(DistillSample(e, ids, probs))
        with contextlib.ExitStack() as stack:
            transfers: list[Transfer] = [
                stack.enter_context(self.plugin.transfer(direction, rnd, p, node, lm, candidates.get(p, [])))
                for p in pairs]
            paths = encode_paths(lm, [pp for t in transfers for pp in path_pairs(t.items)], self.cfg.train.max_length)
            mix = samples + paths
            stats = distill(lm, mix, transfer_steps(self.cfg, len(mix), o.epochs), self.cfg.train, seed, o.alpha,
                            1.0 - o.alpha, mean_loss(transfers), desc=f"{node.participant} fedmkt {direction}")
        metrics = {"kd_loss": stats["kd_loss"], "lm_loss": stats["lm_loss"], "distill_samples": len(samples),
                   "distill_paths": len(paths), "distill_steps": stats["steps"],
                   "other_share": n_other / len(samples) if samples else 0.0,
                   "aligned_share": float(np.mean(aligned_share)) if aligned_share else 0.0}
        if not np.isnan(stats["extra_loss"]):
            metrics["extra_loss"] = stats["extra_loss"]
        for name, v in metrics.items():
            node.log_metric(name, v)
        return metrics

    # ---- server side
    def server_send(self, phase, rnd, server, client_ids):
        if phase == "vocab":
            payload = vocab_of(server.model().tokenizer).to_payload()
            return {k: dict(payload) for k in client_ids}
        if phase in ("local_train", "client_logits"):
            return {k: {"round": rnd} for k in client_ids}
        if phase == "server_logits":
            lm = server.model()
            _, tk = self._topk(server, lm, vocab_of(lm.tokenizer))
            payload = {**tk.to_payload(), **self.plugin.paths_to_send("down", rnd, server)}
            return {k: dict(payload) for k in client_ids}
        raise KeyError(f"fedmkt: unknown phase {phase!r}")

    def server_receive(self, phase, rnd, replies, server):
        if phase == "vocab":
            own = vocab_of(server.model().tokenizer)
            for k, reply in replies.items():
                save_mapping(server, f"client{k}_to_llm", Vocab.from_payload(reply), own)
        elif phase == "client_logits":
            lm = lora_model(server, self.options.llm_lora_r)
            vocab = vocab_of(lm.tokenizer)
            senders = {k: (TopK.from_payload(r, f"client-{k} top-k"), load_mapping(server, f"client{k}_to_llm"))
                       for k, r in replies.items()}
            candidates = {k: self.plugin.paths_received("up", r, server) for k, r in replies.items()}
            self._transfer("up", rnd, server, lm, vocab, senders, candidates, server.seed + rnd)
            server.save_model(lm)
            server.save_state()

    # ---- client side
    def client_handle(self, phase, rnd, payload, client):
        lm = lora_model(client, self.options.lora_r)
        vocab = vocab_of(lm.tokenizer)
        if phase == "vocab":
            save_mapping(client, "llm_to_client", Vocab.from_payload(payload), vocab)
            return vocab.to_payload()
        if phase == "local_train":
            if not self.options.local_train:
                return {"train_loss": float("nan")}
            stats = train_steps(lm, private_pairs(client.train_set), self.cfg.train.local_steps, self.cfg.train,
                                seed=client.seed + rnd, desc=f"{client.participant} local")
            client.save_model(lm)
            client.log_metric("train_loss", stats["loss"])
            return {"train_loss": float(stats["loss"])}
        if phase == "client_logits":
            _, tk = self._topk(client, lm, vocab)
            return {**tk.to_payload(), **self.plugin.paths_to_send("up", rnd, client)}
        if phase == "server_logits":
            tk = TopK.from_payload(payload, "server top-k")
            candidates = {client.index: self.plugin.paths_received("down", payload, client)}
            m = self._transfer("down", rnd, client, lm, vocab, {client.index: (tk, load_mapping(client, "llm_to_client"))},
                               candidates, client.seed + 7919 * rnd)
            client.save_model(lm)
            return {k: float(v) for k, v in m.items()}
        raise KeyError(f"fedmkt: unknown phase {phase!r}")
