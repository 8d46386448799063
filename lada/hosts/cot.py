"""One-way chain-of-thought distillation: the LLM writes reasoning paths for the
public questions, paths with a wrong answer (or a wrong calculator step) are dropped,
and every client fine-tunes on the remaining paths together with its private data."""

from __future__ import annotations

from dataclasses import dataclass

from lada.hosts.common import items_from_payload, items_to_payload, private_pairs, sample_verified_paths
from lada.protocol.host import Host, Phase


@dataclass
class CoTConfig:
    check_steps: bool = True  # a path must get every <<expr=value>> step right, not only the answer


class CoTHost(Host):
    name = "cot"
    config_cls = CoTConfig
    transfers_up = False

    def phases(self, rnd: int) -> list[Phase]:
        return [Phase("distill", "train")]

    def server_send(self, phase, rnd, server, client_ids):
        lm = server.model()
        items = sample_verified_paths(self.cfg, lm, server.public, seed=server.seed + rnd,
                                      check_steps=self.options.check_steps)
        server.log_metric("paths_correct", len(items))
        server.log_metric("paths_sampled", len(server.public) * self.cfg.generation.paths_per_question)
        payload = items_to_payload(items)
        return {k: dict(payload) for k in client_ids}

    def client_handle(self, phase, rnd, payload, client):
        from lada.models.training import train_steps

        lm = client.model()
        candidates = items_from_payload(payload, client.public)
        chosen = self.plugin.select("down", rnd, candidates, client, lm, client.index)
        mix = private_pairs(client.train_set) + [(it["prompt"], it["text"]) for it in chosen]
        extra = self.plugin.extra_loss("down", rnd, chosen, client, lm, client.index)
        stats = train_steps(lm, mix, self.cfg.train.local_steps, self.cfg.train, seed=client.seed + rnd,
                            extra_loss=extra, desc=f"{client.participant} distill")
        self.plugin.after_update("down", rnd, chosen, client, lm, client.index)
        client.save_model(lm)
        client.log_metric("candidates", len(candidates))
        client.log_metric("selected", len(chosen))
        client.log_metric("train_loss", stats["loss"])
        return {"selected": len(chosen), "train_loss": float(stats["loss"])}
