"""The Flower ClientApp: one generic handler for every phase of every host.

Flower 1.42 routes ``<category>.<action>`` messages to functions registered per
action (``@app.train("distill")``) and has no catch-all. Phase names come from hosts
and plug-ins, which can be added without touching the engine, so this ClientApp
subclass routes every valid message type (category ``train``, ``evaluate`` or
``query``; action = phase name) to `handle`, which calls the transport-independent
`lada.protocol.driver.handle_message`.
"""

from __future__ import annotations

import traceback

from flwr.app import Context, Message
from flwr.app.metadata import validate_message_type
from flwr.clientapp import ClientApp

from lada.engines.records import payload_to_recorddict, recorddict_to_payload
from lada.protocol.driver import handle_message

CATEGORIES = ("train", "evaluate", "query")


def handle(message: Message, context: Context) -> Message:
    """Answer one message: unpack the payload, run the phase, pack the reply.

    Failures (including ones while packing the reply) travel back as an ``error``
    entry so the server fails the run with this client's traceback."""
    category, _, phase = message.metadata.message_type.partition(".")
    payload, meta = recorddict_to_payload(message.content)
    rnd = int(meta.get("round", 0))
    reply = handle_message(phase, rnd, payload, dict(context.node_config), dict(context.run_config))
    try:
        content = payload_to_recorddict(reply, meta)
    except Exception:  # noqa: BLE001 - reply must still reach the server
        content = payload_to_recorddict({"error": f"client reply to {phase!r} could not be packed:\n"
                                         + traceback.format_exc(limit=5)}, meta)
    return Message(content, reply_to=message)


class PhaseClientApp(ClientApp):
    """A ClientApp that sends every ``<category>.<phase>`` message to `handle`."""

    def __call__(self, message: Message, context: Context) -> Message:
        mtype = message.metadata.message_type
        category, _, phase = mtype.partition(".")
        if category not in CATEGORIES or not phase or not validate_message_type(mtype):
            raise ValueError(f"lada ClientApp: unsupported message type {mtype!r}; "
                             f"expected '<{'|'.join(CATEGORIES)}>.<phase name>'")
        return handle(message, context)


app = PhaseClientApp()
