"""The HTTP plumbing the gateway and both engine fronts share: server-sent events
(`sse`), an answer as it goes out (`answer`), ASGI requests (`asgi`), the client to
upstream servers (`upstream`), the stop of what is in flight (`stopping`), and the one
module that touches uvicorn's internals (`server`)."""
