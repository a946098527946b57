"""The multi-user gateway: auth, rate limits, usage log, and the relay to the engine."""
