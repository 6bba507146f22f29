"""Pixels in and out, numpy and PIL only (never torch): reading images and DICOM, the square
working geometry, atomic file writes with provenance, masks and their morphology, annotation
panels and animations (GIF/WebP/PNG/MP4).
"""
