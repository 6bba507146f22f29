"""The square geometry pie works in, and its limits: pure arithmetic (no numpy, PIL or torch).

An image of any size becomes R x R (R = ``--resolution``) by resizing its short side to R and
cropping the centre; masks made by ``pie mask`` and every frame use the same box, so they
always line up. The command line checks resolutions with :func:`resolution_problem` before
anything heavy is imported.
"""

from __future__ import annotations

# The smallest image side pie accepts: one 8 x 8 latent cell of Stable Diffusion's VAE.
MIN_IMAGE_SIDE = 8
# Working resolutions above this are refused up front: 4096 px is 16x SD's working area, a 4096 x 4096
# mask already needs a few GB of numpy temporaries, and a typo like 51200 would end out of memory.
MAX_RESOLUTION = 4096


def resolution_problem(resolution: int) -> str | None:
    """What is wrong with a working resolution (a multiple of 8 in [8, MAX_RESOLUTION]), or None."""
    if resolution < 8 or resolution % 8:
        return f"must be a positive multiple of 8, got {resolution}"
    if resolution > MAX_RESOLUTION:
        return f"must be at most {MAX_RESOLUTION}, got {resolution}"
    return None


def square_geometry(
    size: tuple[int, int], resolution: int
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resized size (short side = resolution) and centre-crop box for an image of ``size``."""
    w, h = size
    if w <= h:
        new = (resolution, max(resolution, round(h * resolution / w)))
    else:
        new = (max(resolution, round(w * resolution / h)), resolution)
    left = (new[0] - resolution) // 2
    top = (new[1] - resolution) // 2
    return new, (left, top, left + resolution, top + resolution)
