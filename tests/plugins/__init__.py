"""Reward plugins that tests load by import path or through a temporary entry point."""
