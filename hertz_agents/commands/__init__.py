"""The ``hertz-agents`` subcommands, one module each."""
