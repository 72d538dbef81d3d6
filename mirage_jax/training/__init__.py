"""Training: one package per concern, reading downward.

  * ``stage``: what a training stage is (the ``Stage`` protocol and its defaults), the batch
    and state types, and the config checks stages share; imports no family;
  * ``flops``: FLOP counting of traced functions and accelerator peaks (for MFU);
  * ``mesh``, ``optimizer``, ``step``, ``inputs``, ``executables``: the mesh, AdamW, the
    stage with its sharded state and jitted steps, the input pipeline, compiled-step files
    and the compilation cache;
  * ``loop``: ``train_and_evaluate``, the loop that runs them.

The stages themselves live with their family (``mirage_jax.families.<name>``), reached
through ``mirage_jax.families.make_stage``.
"""
