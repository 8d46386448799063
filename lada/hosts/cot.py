"""Chain-of-thought path distillation: the LLM writes reasoning paths for the public
questions, paths with a wrong answer (or a wrong calculator step) are dropped, and
every client fine-tunes on the remaining paths together with its private data.

With ``upward = true`` the paths also flow the other way, SLM -> LLM: every client
sends its own verified paths on the public questions, and the LLM fine-tunes on them
(only on questions none of its own sampled paths solve, with ``up_novel_only``), mixed
with replayed examples of its own training data. This runs with or without a plug-in,
so a plug-in's effect is measured on the same transfers.

Each direction is one plug-in transfer per (LLM, SLM_k) pair: the candidates are the
sender's verified paths, the receiver trains on the plug-in's selection (all of them
for the plain host) with its extra loss, for ``train.transfer_epochs`` passes over
the training mix.
"""

from __future__ import annotations

import contextlib
import random

from lada.hosts.common import path_pairs, private_pairs, replay_pairs, transfer_steps
from lada.hosts.options import CoTConfig
from lada.models.training import train_steps
from lada.protocol.host import Capabilities, Host, Phase, mean_loss
from lada.protocol.paths import paths_from_payload, paths_to_payload, sample_paths_verified

DOWN = Phase("distill", "train")
UP = Phase("distill_up", "train")


class CoTHost(Host):
    name = "cot"
    config_cls = CoTConfig
    capabilities = Capabilities(directions=frozenset({"down"}), path_directions=frozenset({"down"}))

    @property
    def caps(self) -> Capabilities:
        if not self.options.upward:
            return self.capabilities
        both = frozenset({"down", "up"})
        return Capabilities(directions=both, path_directions=both)

    def phases(self, rnd: int) -> list[Phase]:
        return [DOWN, UP] if self.options.upward else [DOWN]

    # ---- server side
    def server_send(self, phase, rnd, server, client_ids):
        if phase == DOWN.name:
            cands = sample_paths_verified(self.cfg, server.model(), server.public, seed=server.seed + rnd,
                                          check_steps_too=self.options.check_steps)
            # The LLM does not train before distill_up, so these paths also say which
            # questions it solves there (no second sampling of the same model).
            self._solved = (rnd, {c.question_id for c in cands})
            server.log_metric("paths_correct", len(cands))
            server.log_metric("paths_sampled", len(server.public) * self.cfg.generation.paths_per_question)
            payload = paths_to_payload(cands)
            return {k: dict(payload) for k in client_ids}
        if phase == UP.name:
            n = self.options.up_questions
            if n <= 0 or n >= len(server.public):
                return {k: {"all_public": True} for k in client_ids}
            ids = [ex.id for ex in random.Random(server.seed * 17 + rnd).sample(list(server.public), n)]
            return {k: {"example_ids": list(ids)} for k in client_ids}
        raise KeyError(f"cot: unknown phase {phase!r}")

    def server_receive(self, phase, rnd, replies, server):
        if phase != UP.name:
            return
        lm = server.model()
        received = {k: paths_from_payload(replies[k], server.public, where=f"client-{k} paths")
                    for k in sorted(replies)}
        solved: set[str] = set()
        if self.options.up_novel_only:
            qids = sorted({c.question_id for cands in received.values() for c in cands})
            cached = getattr(self, "_solved", None)
            if cached is not None and cached[0] == rnd:
                solved = cached[1] & set(qids)
            else:  # distill ran in another process (not the case in lada's engines)
                by_id = {ex.id: ex for ex in server.public}
                own = sample_paths_verified(self.cfg, lm, [by_id[q] for q in qids], seed=server.seed * 3 + rnd,
                                            check_steps_too=self.options.check_steps)
                solved = {c.question_id for c in own}
        server.log_metric("up_received", sum(len(c) for c in received.values()))
        server.log_metric("up_llm_solved", len(solved))
        with contextlib.ExitStack() as stack:
            transfers = [stack.enter_context(self.plugin.transfer(
                "up", rnd, k, server, lm, [c for c in cands if c.question_id not in solved]))
                for k, cands in received.items()]
            pairs = [p for t in transfers for p in path_pairs(t.items)]
            replay = replay_pairs(server.train_set, round(self.options.up_replay * len(pairs)),
                                  seed=server.seed * 31 + rnd)
            steps = transfer_steps(self.cfg, len(pairs) + len(replay)) if pairs else 0
            stats = train_steps(lm, pairs + replay, steps, self.cfg.train, seed=server.seed + rnd,
                                extra_loss=mean_loss(transfers), desc="llm distill_up")
        if steps:
            server.save_model(lm)
        server.log_metric("up_trained", len(pairs))
        server.log_metric("up_train_steps", stats["steps"])
        server.log_metric("up_train_loss", stats["loss"])

    # ---- client side
    def client_handle(self, phase, rnd, payload, client):
        if phase == DOWN.name:
            return self._distill(rnd, payload, client)
        if phase == UP.name:
            if payload.get("all_public"):
                exs = list(client.public)
            else:
                by_id = {ex.id: ex for ex in client.public}
                unknown = [i for i in payload.get("example_ids", []) if i not in by_id]
                if unknown:
                    raise KeyError(f"{client.participant}: distill_up names unknown public example id(s) {unknown[:3]}")
                exs = [by_id[i] for i in payload["example_ids"]]
            cands = sample_paths_verified(self.cfg, client.model(), exs, seed=client.seed + 7919 * rnd,
                                          check_steps_too=self.options.check_steps)
            client.log_metric("up_sent", len(cands))
            return paths_to_payload(cands)
        raise KeyError(f"cot: unknown phase {phase!r}")

    def _distill(self, rnd, payload, client):
        lm = client.model()
        candidates = paths_from_payload(payload, client.public, where="LLM paths")
        with self.plugin.transfer("down", rnd, client.index, client, lm, candidates) as t:
            mix = private_pairs(client.train_set) + path_pairs(t.items)
            stats = train_steps(lm, mix, transfer_steps(self.cfg, len(mix)), self.cfg.train, seed=client.seed + rnd,
                                extra_loss=t.loss, desc=f"{client.participant} distill")
        client.save_model(lm)
        client.log_metric("candidates", len(candidates))
        client.log_metric("selected", len(t.items))
        client.log_metric("train_steps", stats["steps"])
        client.log_metric("train_loss", stats["loss"])
        return {"selected": len(t.items), "train_loss": float(stats["loss"])}
