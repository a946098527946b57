"""Database access: users, keys, rate-limit state and the request log, in PostgreSQL.

The store never imports the web framework; the gateway never writes SQL.
"""
