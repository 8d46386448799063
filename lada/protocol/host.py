"""The round-phase interface every collaboration framework ("host") implements, the
capabilities it declares, and the transfer lifecycle through which a plug-in (LaDa)
changes what a receiver learns from.

A round is a list of phases. For each phase the server prepares one payload per
client (`server_send`), every client answers (`client_handle`), and the server
consumes the replies (`server_receive`). A phase whose `server_send` returns an empty
dict is server-only. The engine moves payloads; it knows nothing of the phases, so a
new host is one module implementing this class, registered in `lada.registry`.

A transfer is one receiver training on what one sender sent it, in one direction
("down": LLM -> SLM, "up": SLM -> LLM). Around every transfer the host opens

    with plugin.transfer(direction, rnd, pair, node, receiver_lm, candidates) as t:
        ... train the receiver on its usual data plus t.items, adding t.loss(step) ...

``candidates`` are sender reasoning paths (:class:`lada.protocol.paths.Candidate`);
``t.items`` is the plug-in's selection of them, ``t.loss`` its extra loss (or None).
On a normal exit the plug-in observes the trained receiver (rewards, filter update).
The default plug-in keeps every candidate and adds nothing: the plain host.

Where do the candidates come from? A host whose own exchange is reasoning paths
(declared in ``Capabilities.path_directions``) passes those. A host that moves
knowledge some other way (logits, adapters) lets the plug-in's paths ride beside its
own messages: it merges ``plugin.paths_to_send(direction, rnd, node)`` into the
sender's payload and passes ``plugin.paths_received(direction, payload, node)`` as the
candidates. Those keys start with ``PLUGIN_PREFIX`` and the driver reports their bytes
apart (``lada_bytes_up`` / ``lada_bytes_down``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, runtime_checkable

from lada.protocol.payload import Payload

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.data.records import Example
    from lada.protocol.node import ClientNode, ServerNode
    from lada.protocol.paths import Candidate

DIRECTIONS = ("down", "up")
PLUGIN_PREFIX = "lada/"  # payload keys a plug-in adds to a host's messages (bytes counted apart)


@dataclass(frozen=True)
class Phase:
    """One step of a round. ``kind`` picks the Flower message category
    (``train``, ``evaluate`` or ``query``); the message type is ``<kind>.<name>``."""

    name: str
    kind: str = "train"


@dataclass(frozen=True)
class Capabilities:
    """What a host does, so that plug-ins and experiment grids never need its name.

    collaborative    knowledge moves between the LLM and the SLMs at all (a plug-in
                     has something to act on)
    shared_slm       every client must run the same SLM (e.g. adapters are averaged)
    directions       the directions in which the host transfers knowledge; it opens a
                     plug-in transfer for each of them every round
    path_directions  of those, the ones whose own exchange is verified sender reasoning
                     paths (the candidates); in the others the plug-in's paths ride beside
                     the host's messages
    """

    collaborative: bool = True
    shared_slm: bool = False
    directions: frozenset[str] = frozenset()
    path_directions: frozenset[str] = frozenset()


@runtime_checkable
class PluginNode(Protocol):
    """What a plug-in sees of a participant (the server, a client, or a test's fake)."""

    workspace: Path
    seed: int  # the participant's seed for this run

    @property
    def public(self) -> list["Example"]: ...

    def log_metric(self, name: str, value: float) -> None: ...

    def add_metric(self, name: str, value: float) -> None: ...


LossFn = Callable[[int], Any]  # step -> scalar tensor (or None)


@dataclass
class Transfer:
    """One open transfer: what the receiver trains on from the sender, and how."""

    direction: str
    pair: int  # the client index of the (LLM, SLM_pair) pair
    items: list["Candidate"]  # the sender paths to train on (SFT)
    loss: LossFn | None = None  # extra loss to add at every training step, or None
    n_candidates: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # the plug-in's own bookkeeping


def mean_loss(transfers: list[Transfer]) -> LossFn | None:
    """One extra-loss function for several transfers trained together (e.g. every
    client's paths into the LLM): the *mean* of their losses, so the extra term weighs
    the same whether one pair or many feed a receiver."""
    fns = [t.loss for t in transfers if t.loss is not None]
    if not fns:
        return None

    def loss(step: int):
        parts = [x for f in fns if (x := f(step)) is not None]
        return sum(parts) / len(parts) if parts else None

    return loss


class Plugin:
    """The plain plug-in: a transfer keeps every candidate and adds no loss, and no
    paths ride on a host's messages. A host with this plug-in is the plain host."""

    name = "none"
    config_cls: type | None = None

    def __init__(self, cfg: "RunConfig", options: Any = None) -> None:
        self.cfg = cfg
        self.options = options
        self.caps = Capabilities()

    def attach(self, caps: Capabilities) -> None:
        """Called by the host it is plugged into, before any phase runs."""
        self.caps = caps

    @contextlib.contextmanager
    def transfer(self, direction: str, rnd: int, pair: int, node: PluginNode, lm: Any,
                 candidates: list["Candidate"]) -> Iterator[Transfer]:
        if direction not in DIRECTIONS:
            raise ValueError(f"transfer: direction must be one of {DIRECTIONS}, got {direction!r}")
        yield Transfer(direction, pair, [c for c in candidates if c.verified], None, len(candidates))

    def paths_to_send(self, direction: str, rnd: int, node: Any) -> Payload:
        """Payload entries (keys starting with ``PLUGIN_PREFIX``) to add to the sender's
        message in ``direction`` on hosts whose own exchange is not paths."""
        return {}

    def paths_received(self, direction: str, payload: Payload, node: PluginNode) -> list["Candidate"]:
        """The candidates in a message that ``paths_to_send`` filled."""
        return []


class Host:
    """Base class of collaboration frameworks. Subclasses set ``name``,
    ``config_cls`` (for error messages; options are registered in ``lada.registry``) and
    ``capabilities``, and implement the three phase methods."""

    name = "base"
    config_cls: type | None = None
    capabilities = Capabilities()

    def __init__(self, cfg: "RunConfig", options: Any, plugin: Plugin) -> None:
        self.cfg = cfg
        self.options = options
        self.plugin = plugin
        plugin.attach(self.caps)

    @property
    def caps(self) -> Capabilities:
        """This instance's capabilities (a host option may change them)."""
        return self.capabilities

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
