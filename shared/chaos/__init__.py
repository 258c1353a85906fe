"""``tokenbus chaos``: real processes, real signals, counting what every stream received.

``procs`` starts Redis, gateways and workers; ``follow`` reads sessions as clients do (SSE or
WebSocket, resuming on another gateway); ``scenarios`` injects one fault each and ``report``
counts completed, lost, duplicated, restarted and stuck streams. tests/faults runs the same
scenarios small; ``tokenbus chaos`` runs them at scale.
"""
