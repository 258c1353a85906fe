"""The session stream: one home for what an event's place in a session is and how it travels.

``position``: the position type (epoch, offset; parse, format, compare), the history entry's
field, and reading an event's position from the front of its JSON without decoding it (stdlib
only, so the client can use it). ``publish``: the atomic publish (history + PUBLISH, fenced by
a job's lease) and its Lua script. ``history``: reading a session's position and history.
"""
