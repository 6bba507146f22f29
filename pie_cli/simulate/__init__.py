"""`pie simulate` as a service: a checked spec -> one model load -> one case (K trajectories),
a resumed case, or a cohort of cases. Returns results; prints nothing.
"""
