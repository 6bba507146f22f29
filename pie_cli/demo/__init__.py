"""Offline demo assets: a tiny Stable-Diffusion-shaped model and a synthetic chest-X-ray-like input."""
