"""The Wan family: Mirage's own networks (Wan2.2-TI2V-5B DiT + VACE + LoRA, the Wan2.2 VAE).

``dit``, ``vae``: the networks; ``conditioning``: memory, VACE and timestep inputs (what
training and generation share); ``world_model``: generation (``WorldModel``); ``stages``: the
fine-tuning stage; ``convert``, ``weight_files``, ``original_layout``: the released weights.
"""
