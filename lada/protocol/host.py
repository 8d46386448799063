"""The round-phase interface every collaboration framework ("host") implements,
and the hooks a plug-in (LaDa) uses to change what a host transfers and how.

A round is a list of phases. For each phase the server prepares one payload per
client (`server_send`), every client answers (`client_handle`), and the server
consumes the replies (`server_receive`). A phase whose `server_send` returns an empty
dict is server-only. The engine moves payloads; it knows nothing of the phases, so a
new host is one module implementing this class, registered in `lada.hosts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from lada.protocol.payload import Payload

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.protocol.node import ClientNode, ServerNode


@dataclass(frozen=True)
class Phase:
    """One step of a round. ``kind`` picks the Flower message category
    (``train``, ``evaluate`` or ``query``); the message type is ``<kind>.<name>``."""

    name: str
    kind: str = "train"


class Plugin:
    """Hooks a host calls on the samples it transfers. The default keeps every
    candidate and adds no loss: a host with this plug-in is the plain host."""

    name = "none"

    def __init__(self, cfg: "RunConfig", options: Any = None) -> None:
        self.cfg = cfg
        self.options = options

    # Extra phases of the plug-in, run after the host's phases each round.
    def phases(self, rnd: int) -> list[Phase]:
        return []

    def server_send(self, phase: str, rnd: int, server: "ServerNode", client_ids: list[int]) -> dict[int, Payload]:
        raise KeyError(f"plug-in {self.name!r} has no phase {phase!r}")

    def client_handle(self, phase: str, rnd: int, payload: Payload, client: "ClientNode") -> Payload:
        raise KeyError(f"plug-in {self.name!r} has no phase {phase!r}")

    def server_receive(self, phase: str, rnd: int, replies: dict[int, Payload], server: "ServerNode") -> None:
        raise KeyError(f"plug-in {self.name!r} has no phase {phase!r}")

    # Hooks on a host's transfer. ``direction`` is "down" (LLM -> SLM, called on the
    # client) or "up" (SLM -> LLM, called on the server); ``items`` are the host's
    # candidate samples (dicts with at least "example_id", "prompt", "text").
    def select(self, direction: str, rnd: int, items: list[dict], node: Any, lm: Any, pair: int) -> list[dict]:
        return items

    def extra_loss(self, direction: str, rnd: int, items: list[dict], node: Any, lm: Any, pair: int) -> Callable[[int], Any] | None:
        return None

    def after_update(self, direction: str, rnd: int, items: list[dict], node: Any, lm: Any, pair: int) -> None:
        return None


class Host:
    """Base class of collaboration frameworks. Subclasses set ``name`` and
    ``config_cls`` and implement the three phase methods."""

    name = "base"
    config_cls: type | None = None

    def __init__(self, cfg: "RunConfig", options: Any, plugin: Plugin) -> None:
        self.cfg = cfg
        self.options = options
        self.plugin = plugin

    def phases(self, rnd: int) -> list[Phase]:
        raise NotImplementedError

    def server_send(self, phase: str, rnd: int, server: "ServerNode", client_ids: list[int]) -> dict[int, Payload]:
        raise NotImplementedError

    def client_handle(self, phase: str, rnd: int, payload: Payload, client: "ClientNode") -> Payload:
        raise NotImplementedError

    def server_receive(self, phase: str, rnd: int, replies: dict[int, Payload], server: "ServerNode") -> None:
        return None

    # Called on both sides once, before round 1 (e.g. check client compatibility).
    def server_setup(self, server: "ServerNode", setup_replies: dict[int, Payload]) -> None:
        return None
