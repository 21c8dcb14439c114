"""hertz_agents.model"""
