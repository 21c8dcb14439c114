"""hertz_agents.engine"""
