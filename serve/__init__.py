"""Ray Serve deployments (ingress, user encoder, retriever, ranker) live here.

Not built yet: serving is issue #4; nothing in this package is used by the jobs today.
"""
