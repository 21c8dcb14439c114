"""``hertz-agents serve``: the inference server (see docs/server.md)."""
