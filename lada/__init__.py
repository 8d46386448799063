"""lada: federated reasoning distillation between a server LLM and heterogeneous client SLMs."""

__version__ = "0.1.0"
