"""``python -m hertz_agents.server [serve options]``: the same as ``hertz-agents serve``."""

import sys

from hertz_agents.server.cli import main

sys.exit(main())
