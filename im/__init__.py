"""Shared core of the push gateway: wire protocol, RPC, auth, config, metrics and the SDK."""

__version__ = "0.1.0"
