"""`pie evaluate` as a service: per-frame metrics of a run, optional classifier confidence and
CLIP-I, and the report image. Returns results; prints nothing.
"""
