"""Pod: a v5e-256 slice (256 chips, 16 GiB HBM each, topology 16x16), same model as pod_v5p_128.

v5e chips have 16 GiB, so the DiT is also split over heads / MLP (tensor=4) and the batch
over 64-way fsdp; one example per 4 chips. The autoencoder stage stays pure fsdp (its
convolutions are small: splitting them only adds traffic).

  python -m mirage_jax.aot --config=experiments/pod_v5e_256.py:denoiser --topology=v5e:16x16
Two slices over DCN (v5e-256 x 2): --config.dcn_mesh.data=2 and --num_slices=2.
"""

from experiments import pod_v5p_128


def get_config(stage=None):
  c = pod_v5p_128.get_config(stage)
  if c.stage == "denoiser":
    c.mesh = dict(data=1, fsdp=-1, context=1, tensor=4)
    c.data.batch_size = 64
  return c
