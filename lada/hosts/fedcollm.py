"""FedCoLLM (Fan et al., arXiv 2411.11707): clients share one SLM architecture and train
LoRA adapters on private data; the server averages the adapters (FedAvg weighted by
examples), keeps its own copy of the SLM, and runs mutual distillation between the LLM
and the averaged SLM on the public set before the adapter goes back down.

Each round:

1. ``base`` (round 1 only): the server broadcasts the shared SLM starting point. The
   paper's clients start from one public pretrained SLM. Here each client's tiny SLM
   is warmed up separately (own seed and data), so adapters trained on them would live
   in unrelated weight spaces; the server therefore sends one base (the SLM architecture
   warmed up on the server's general data only, never on a client's private data) and
   the initial adapter to everyone, and its bytes are counted. A pure
   pretrained SLM (no warm-up) is identical everywhere, so only the adapter is sent.
2. ``local_train``: every client trains its adapter on private data and sends it up
   with its number of training examples.
3. The server averages the adapters into its SLM copy, then (as FATE-LLM's reference
   implementation orders it) computes the LLM's top-k distributions on the public set,
   trains the SLM with ``LM + lambda * KD`` toward them, computes the updated SLM's
   distributions and trains the LLM the same way toward those. When the two tokenizers
   differ, distributions go through the minimum-edit-distance token mapping and byte-
   offset alignment of :mod:`lada.hosts.token_alignment`.
4. ``sync``: the distilled SLM adapter goes down; clients load it.

Plug-in transfers (``lada.protocol.host``): the LLM -> SLM distillation is the "down"
transfer (pair 0: the shared SLM) and SLM -> LLM the "up" transfers (one per client),
both on the server. FedCoLLM's own exchange is adapters, so a plug-in's paths ride
beside it: each client adds its SLM's paths to the ``local_train`` reply (keys
``lada/...``, bytes reported apart); the LLM's paths for the down transfer never leave
the server. Each distillation trains on the whole public set as the host does plus the
plug-in's selected paths (LM loss), with the mean of the pairs' extra losses, for
``[host] epochs`` passes over that mix (1; 0: ``train.transfer_epochs``). The LLM trains
LoRA adapters of rank ``llm_lora_r`` (8; 0: all its weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from lada.config import ConfigError
from lada.hosts.common import lora_model, path_pairs, private_pairs, transfer_steps
from lada.hosts.fedmkt import DistillSample, compute_topk, distill, encode_examples, encode_paths, own_targets, \
    transfer_targets
from lada.hosts.options import FedCoLLMConfig
from lada.hosts.token_alignment import build_token_mapping, vocab_of
from lada.models.loading import load_model
from lada.models.training import train_steps
from lada.protocol.host import Capabilities, Host, Phase, mean_loss
from lada.protocol.node import ClientNode, SharedSLMNode, cache_dir
from lada.protocol.payload import Payload

if TYPE_CHECKING:
    from lada.models.loading import LoadedModel
    from lada.protocol.node import Node, ServerNode
    from lada.protocol.paths import Candidate

ADAPTER_PREFIX = "lora/"
BASE_PREFIX = "base/"
# ModelConfig fields that must agree for adapters to be averaged.
ARCH_FIELDS = ("name", "hidden_size", "num_layers", "num_heads", "vocab_size", "lora_r", "lora_alpha")


# ----------------------------------------------------------------------------- pure pieces

def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """FedAvg: the weight-averaged arrays (computed in float64, returned in each
    array's dtype). All states must have the same keys and shapes."""
    if not states:
        raise ValueError("weighted_average: no states to average")
    if len(states) != len(weights):
        raise ValueError(f"weighted_average: {len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weighted_average: weights must be >= 0 with a positive sum, got {weights}")
    w = w / w.sum()
    keys = sorted(states[0])
    for i, s in enumerate(states[1:], start=1):
        if sorted(s) != keys:
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"weighted_average: state {i} has different keys than state 0, e.g. {diff[:3]}")
        for key in keys:
            if s[key].shape != states[0][key].shape:
                raise ValueError(f"weighted_average: {key!r} has shape {s[key].shape} in state {i} "
                                 f"but {states[0][key].shape} in state 0")
    return {key: sum(wi * s[key].astype(np.float64) for wi, s in zip(w, states)).astype(states[0][key].dtype)
            for key in keys}


def check_same_slm(cfg, setup_replies: dict[int, Payload]) -> None:
    """FedCoLLM averages adapters, so every client must run the same SLM: same config
    architecture and the same model name, vocabulary size and parameter count reported
    at setup. Raises ConfigError listing every client's values otherwise."""
    rows = {k: {f: getattr(c, f) for f in ARCH_FIELDS} for k, c in enumerate(cfg.clients)}
    for k, r in setup_replies.items():
        rows.setdefault(k, {}).update({"model (setup)": r.get("model"), "vocab_size (setup)": r.get("vocab_size"),
                                       "params (setup)": r.get("params")})
    fields = sorted({f for row in rows.values() for f in row})
    bad = [f for f in fields if len({repr(row.get(f)) for row in rows.values()}) > 1]
    if bad:
        table = "\n".join(f"  client-{k}: " + ", ".join(f"{f}={rows[k].get(f)!r}" for f in bad) for k in sorted(rows))
        raise ConfigError(f"{cfg.source_file or 'config'}: host 'fedcollm' needs every client to run the same SLM "
                          f"(it averages their LoRA adapters), but they differ in {bad}:\n{table}\n"
                          "Give every [[clients]] table the same model settings, or use host 'fedmkt' for "
                          "heterogeneous SLMs.")


# ----------------------------------------------------------------------------- adapters

def adapter_arrays(lm: "LoadedModel", dtype: str = "float32") -> dict[str, np.ndarray]:
    """The LoRA adapter of a model as numpy arrays, keyed ``lora/<name>``."""
    sd = get_peft_model_state_dict(lm.model)
    return {ADAPTER_PREFIX + k: v.detach().float().cpu().numpy().astype(dtype) for k, v in sd.items()}


def load_adapter(lm: "LoadedModel", payload: Payload) -> None:
    """Install adapter arrays from a payload into a LoRA model (names must match)."""
    own = set(adapter_arrays(lm))
    got = {k for k in payload if k.startswith(ADAPTER_PREFIX)}
    if own != got:
        raise ValueError(f"adapter mismatch: {len(got - own)} unexpected and {len(own - got)} missing tensors, "
                         f"e.g. {sorted(got ^ own)[:3]}")
    dtype = next(p for p in lm.model.parameters()).dtype
    sd = {k[len(ADAPTER_PREFIX):]: torch.from_numpy(np.asarray(payload[k], dtype=np.float32)).to(dtype) for k in got}
    set_peft_model_state_dict(lm.model, sd)


def base_arrays(lm: "LoadedModel") -> dict[str, np.ndarray]:
    """Base weights (no adapter) of a LoRA model, keyed ``base/<name>`` as the plain
    model names them."""
    base = lm.model.get_base_model()
    out = {}
    for name, t in base.state_dict().items():
        if "lora_" in name:
            continue
        out[BASE_PREFIX + name.replace(".base_layer.", ".")] = t.detach().float().cpu().numpy()
    return out


# ----------------------------------------------------------------------------- the host

def needs_shared_base(cfg) -> bool:
    """Client SLMs differ unless they are one pretrained model used as is."""
    return any(c.is_tiny or c.warmup_steps > 0 or c.checkpoint for c in cfg.clients)


class FedCoLLMHost(Host):
    name = "fedcollm"
    config_cls = FedCoLLMConfig
    capabilities = Capabilities(shared_slm=True, directions=frozenset({"down", "up"}))

    @property
    def rank(self) -> int:
        return self.cfg.clients[0].lora_r or self.options.lora_r

    def phases(self, rnd: int) -> list[Phase]:
        first = [Phase("base", "train")] if rnd == 1 else []
        return first + [Phase("local_train", "train"), Phase("sync", "train")]

    def server_setup(self, server, setup_replies):
        check_same_slm(self.cfg, setup_replies)

    # The server's copy of the shared SLM lives in its own node folder, starting from a
    # warm-up on the server's general data only (the base every client receives in round
    # 1): no client's private data is in what is broadcast.
    def slm_node(self, server: "ServerNode") -> "ClientNode":
        return SharedSLMNode(self.cfg, server.workspace / "fedcollm-slm")

    # ---- server side
    def server_send(self, phase, rnd, server, client_ids):
        if phase == "local_train":
            return {k: {"round": rnd} for k in client_ids}
        node = self.slm_node(server)
        slm = lora_model(node, self.rank)
        if phase == "base":
            payload = adapter_arrays(slm, self.options.adapter_dtype)
            payload["slm_vocab_hash"] = vocab_of(slm.tokenizer).hash
            if needs_shared_base(self.cfg):
                payload.update(base_arrays(slm))
            node.save_model(slm)
            return {k: dict(payload) for k in client_ids}
        if phase == "sync":
            payload = adapter_arrays(slm, self.options.adapter_dtype)
            return {k: dict(payload) for k in client_ids}
        raise KeyError(f"fedcollm: unknown phase {phase!r}")

    def server_receive(self, phase, rnd, replies, server):
        if phase != "local_train":
            return
        node = self.slm_node(server)
        slm = lora_model(node, self.rank)
        ks = sorted(replies)
        states = [{k: v for k, v in replies[c].items() if k.startswith(ADAPTER_PREFIX)} for c in ks]
        avg = weighted_average(states, [float(replies[c]["n_examples"]) for c in ks])
        load_adapter(slm, avg)
        llm = lora_model(server, self.options.llm_lora_r)
        # LaDa-style plug-ins: the LLM's paths for the shared SLM, each client's paths for the LLM
        down = self.plugin.paths_received("down", self.plugin.paths_to_send("down", rnd, server), server)
        up = {k: self.plugin.paths_received("up", replies[k], server) for k in ks}
        self._mutual_distill(rnd, server, llm, slm, {"down": {0: down}, "up": up})
        node.save_model(slm)
        server.save_model(llm)
        server.save_state()

    def _mutual_distill(self, rnd: int, server: "ServerNode", llm: "LoadedModel", slm: "LoadedModel",
                        candidates: dict[str, dict[int, list["Candidate"]]]) -> None:
        o = self.options
        v_llm, v_slm = vocab_of(llm.tokenizer), vocab_of(slm.tokenizer)
        same = v_llm.hash == v_slm.hash
        maps = {} if same else {"down": build_token_mapping(v_llm, v_slm, _token_map_cache(server)),
                                "up": build_token_mapping(v_slm, v_llm, _token_map_cache(server))}
        max_len, bs = self.cfg.train.max_length, self.cfg.generation.batch_size
        enc_llm = encode_examples(llm, v_llm, server.public, max_len)
        enc_slm = encode_examples(slm, v_slm, server.public, max_len)
        # LLM -> SLM, then SLM (updated) -> LLM
        for direction, teacher, t_enc, t_vocab, student, s_enc, s_vocab in (
                ("down", llm, enc_llm, v_llm, slm, enc_slm, v_slm),
                ("up", slm, enc_slm, v_slm, llm, enc_llm, v_llm)):
            tk = compute_topk(teacher, t_enc, o.top_k, bs, len(t_vocab))
            spans = tk.by_id()
            samples, aligned = [], []
            for e in s_enc:
                if same:
                    ids, probs = own_targets(tk, spans[e.example_id], o.temperature)
                else:
                    ids, probs, ok = transfer_targets(e, tk, spans[e.example_id], maps[direction], len(s_vocab),
                                                      o.temperature)
                    aligned.append(float(ok.mean()) if len(ok) else 0.0)
                samples.append(DistillSample(e, ids, probs))
            with contextlib.ExitStack() as stack:
                transfers = [stack.enter_context(self.plugin.transfer(direction, rnd, pair, server, student, cands))
                             for pair, cands in sorted(candidates[direction].items())]
                paths = encode_paths(student, [p for t in transfers for p in path_pairs(t.items)], max_len)
                mix = samples + paths
                stats = distill(student, mix, transfer_steps(self.cfg, len(mix), o.epochs), self.cfg.train,
                                server.seed + 31 * rnd + (direction == "up"), 1.0, o.distill_lambda,
                                mean_loss(transfers), desc=f"fedcollm {'LLM->SLM' if direction == 'down' else 'SLM->LLM'}")
            who = "slm" if direction == "down" else "llm"
            server.log_metric(f"{who}_kd_loss", stats["kd_loss"])
            server.log_metric(f"{who}_lm_loss", stats["lm_loss"])
            server.log_metric(f"{who}_distill_samples", len(samples))
            server.log_metric(f"{who}_distill_paths", len(paths))
            server.log_metric(f"{who}_distill_steps", stats["steps"])
            if aligned:
                server.log_metric(f"{who}_aligned_share", float(np.mean(aligned)))

    # ---- client side
    def client_handle(self, phase, rnd, payload, client):
        if phase == "base":
            return self._install_base(payload, client)
        if phase == "local_train":
            lm = lora_model(client, self.rank)
            pairs = private_pairs(client.train_set)
            stats = train_steps(lm, pairs, self.cfg.train.local_steps, self.cfg.train, seed=client.seed + rnd,
                                desc=f"{client.participant} local (LoRA)")
            client.save_model(lm)
            client.log_metric("train_loss", stats["loss"])
            reply: Payload = adapter_arrays(lm, self.options.adapter_dtype)
            reply.update(n_examples=len(pairs), train_loss=float(stats["loss"]))
            reply.update(self.plugin.paths_to_send("up", rnd, client))  # the client SLM's paths, for the LLM
            return reply
        if phase == "sync":
            lm = lora_model(client, self.rank)
            load_adapter(lm, payload)
            client.save_model(lm)
            return {"loaded": len([k for k in payload if k.startswith(ADAPTER_PREFIX)])}
        raise KeyError(f"fedcollm: unknown phase {phase!r}")

    def _install_base(self, payload: Payload, client: "ClientNode") -> Payload:
        """Adopt the shared base (if sent) and the initial adapter."""
        base = {k[len(BASE_PREFIX):]: v for k, v in payload.items() if k.startswith(BASE_PREFIX)}
        if base:
            plain = load_model(dataclasses.replace(client.model_cfg, lora_r=0), client.initial_checkpoint(),
                               seed=client.seed)
            if vocab_of(plain.tokenizer).hash != payload["slm_vocab_hash"]:
                raise ValueError(f"{client.participant}: its tokenizer differs from the shared SLM's; FedCoLLM needs "
                                 "one SLM tokenizer (same model config and tokenizer corpus on every client)")
            dtype = next(p for p in plain.model.parameters()).dtype
            plain.model.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in base.items()},
                                        strict=True)
            client.save_model(plain)
        lm = lora_model(client, self.rank)
        load_adapter(lm, payload)
        client.save_model(lm)
        return {"base_tensors": len(base)}


def _token_map_cache(server: "ServerNode"):
    return cache_dir(server.cfg) / "token_maps"
