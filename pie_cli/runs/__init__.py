"""The on-disk contract of a `pie simulate` run folder: its manifest (one schema owner), the
writer that fills it frame by frame, reading its frames back, and the lock that gives a folder
to one process at a time.
"""
