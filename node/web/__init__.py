"""The status page, Prometheus metrics and health checks that `serve` offers over HTTP.

Runs in the `serve` process: it reads the state database and the live parts of the node, and
imports nothing of the compute stack. Read-only except for retry, which needs the secret.
"""
