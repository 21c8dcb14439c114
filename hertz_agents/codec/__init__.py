"""hertz_agents.codec"""
