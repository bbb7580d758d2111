"""Orchestration: which analyses run where (processes, devices), and how their rows are gathered."""
