"""azu: decentralized LLM inference, one layer group per worker."""

__version__ = "0.1.0"
