"""Standalone: every SLM trains on its own private data only; the LLM never changes.
The lower bound every collaboration method must beat."""

from __future__ import annotations

from lada.hosts.common import private_pairs
from lada.models.training import train_steps
from lada.protocol.host import Capabilities, Host, Phase


class StandaloneHost(Host):
    name = "standalone"
    capabilities = Capabilities(collaborative=False)

    def phases(self, rnd: int) -> list[Phase]:
        return [Phase("local_train", "train")]

    def server_send(self, phase, rnd, server, client_ids):
        return {k: {"round": rnd} for k in client_ids}

    def client_handle(self, phase, rnd, payload, client):
        lm = client.model()
        stats = train_steps(lm, private_pairs(client.train_set), self.cfg.train.local_steps, self.cfg.train,
                            seed=client.seed + rnd, desc=f"{client.participant} local")
        client.save_model(lm)
        client.log_metric("train_loss", stats["loss"])
        client.log_metric("train_steps", stats["steps"])
        return {"train_loss": float(stats["loss"])}
