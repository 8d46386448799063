"""Collaboration frameworks ("hosts"). A host is one module with a `Host` subclass
(`lada.protocol.host`) and an options dataclass in `lada.hosts.options`; both are
registered by name in `lada.registry`."""
