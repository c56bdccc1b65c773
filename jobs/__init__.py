"""Jobs: one file each, a typed ``main(cfg)`` that wires components together.

Run locally as ``python -m jobs.<name> key=value ...`` (a local Ray starts on demand) or on a
cluster as ``ray job submit --working-dir . -- python -m jobs.<name> key=value ...``.
"""
