"""Fault-injection tests: processes killed, connections dropped, Redis restarted, hostile
input. Each runs the real programs (`mur worker`, `mur ingest`, `mur api`) against the
session's real broker and redis-server, and compares what they stored with an undisturbed
run of the same input."""
