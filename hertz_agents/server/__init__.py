"""hertz_agents.server"""
