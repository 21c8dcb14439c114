"""hertz_agents.train"""
