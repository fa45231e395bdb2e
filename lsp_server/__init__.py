"""offpilot: offline AI inline completions and code actions as a language server."""

__version__ = "0.1.0"
