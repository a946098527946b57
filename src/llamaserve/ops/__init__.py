"""Operator tools: install, the console, process supervision, the private PostgreSQL
cluster, and the user CLI. The engines and the gateway import nothing from here."""
