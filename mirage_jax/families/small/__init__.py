"""The small family: an RGB-D autoencoder and a DiT on its latents, CPU-sized to pod-sized.

``autoencoder``, ``denoiser``: the networks; ``conditioning``: what training and generation
share (memory settings, the DiT's inputs); ``world_model``: generation (``WorldModel``);
``stages``: the training stages.
"""
