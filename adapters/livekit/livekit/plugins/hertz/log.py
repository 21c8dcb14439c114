"""The plugin's logger, ``livekit.plugins.hertz``."""

import logging

logger = logging.getLogger("livekit.plugins.hertz")
