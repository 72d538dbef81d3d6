"""Depth of generated frames: monocular estimators ported to Flax NNX, and their alignment.

The chunk step writes each new latent into the memory at the depth of its frame. Where that
depth comes from is chosen by configuration (``estimator``): the input's given depth (oracle
geometry, kept for tests and upper bounds), the small family's own RGB-D decoder, or a
monocular network (Depth Anything V2, ``depth_anything``) run inside the jitted step and
aligned to what the memory already knows (``align``).
"""

# Imports nothing heavy: command lines define these flags before JAX loads.
ESTIMATORS = ("given", "decoder", "depth_anything")


def define_flags():
  """Defines ``--depth_estimator``, ``--depth_model``, ``--depth_align`` of an entry point;
  returns ``options(world_model_class) -> DepthOptions`` that reads and checks them (one
  line naming the flag on a choice the family cannot take)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  estimator = flags.DEFINE_enum(
      "depth_estimator", None, list(ESTIMATORS), "Where the depth written into the memory "
      "comes from: the input's depth of every frame (given), the small family's RGB-D decoder "
      "(its default), or a Depth Anything V2 export (depth_anything, with --depth_model). "
      "Default: the family's (Wan: given), or depth_anything when --depth_model is set.")
  model = flags.DEFINE_string("depth_model", None, "Depth Anything V2 export "
                              "(python -m mirage_jax.convert_depth, or a trained 'depth' stage).")
  align = flags.DEFINE_bool("depth_align", None, "Fit each estimate to the memory's depth "
                            "(default on; off keeps a metric model's raw output).")
  return lambda world_model: world_model.depth_options(estimator.value, model.value, align.value)
