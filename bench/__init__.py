"""Llamaserve's benchmark: gateway overhead, the real model on each engine, fairness and
integrity, run against a private stack in a temporary runtime (`python -m bench`)."""
