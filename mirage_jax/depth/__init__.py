"""Depth of generated frames: monocular estimators ported to Flax NNX, and their alignment.

The chunk step writes each new latent into the memory at the depth of its frame. Where that
depth comes from is chosen by configuration (``estimator``): the input's given depth (oracle
geometry, kept for tests and upper bounds), the small family's own RGB-D decoder, or a
monocular network (Depth Anything V2, ``depth_anything``) run inside the jitted step and
aligned to what the memory already knows (``align``).
"""
