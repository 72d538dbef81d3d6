"""Issue 15 on the Wan family: the DiT's precision policy (``model.precision``) and the
training noise-level schemes (``train.noise_levels``) in ``WanStage``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import mirage_wan22_5b
from mirage_jax import diffusion
from mirage_jax.errors import InputError
from mirage_jax.families.wan import conditioning as wan_mirage
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import stages as wan_stage
from tests.test_memory_sharding import wan_memory_batch
from tests.test_wan_dit import _forward, _inputs, _ours, _random_original, _tiny


# ----------------------------------------------------------------------------- precision


def _carry_dtypes(jaxpr) -> set:
  """dtypes of the (B, N, dim) carries of every scan (the layer stacks' residual stream)."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      n = eqn.params["num_carry"]
      found |= {v.aval.dtype for v in eqn.outvars[:n] if v.aval.ndim == 3}
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found |= _carry_dtypes(sub)
  return found


def test_wan_precision_policies():
  weights = _random_original(_tiny(), seed=3)
  latents, text, vace = _inputs(_tiny(), seed=4, b=1, f=3)
  args = (jnp.asarray(latents), jnp.asarray([[0.0, 500.0, 900.0]]), jnp.asarray(text),
          jnp.asarray(vace))
  outs, carries = {}, {}
  for p in ("f32", "f32_residual", "bf16"):
    model = _ours(_tiny(precision=p), weights)
    outs[p] = np.asarray(_forward(model, *args), np.float64)
    carries[p] = _carry_dtypes(jax.make_jaxpr(lambda *a: model(*a[:3], vace_context=a[3]))(
        *args).jaxpr)
  # Main and VACE stacks carry the stream in the policy's residual dtype.
  assert carries == {"f32": {jnp.dtype("float32")}, "f32_residual": {jnp.dtype("float32")},
                     "bf16": {jnp.dtype("bfloat16")}}, carries
  err = lambda p: np.linalg.norm(outs[p] - outs["f32"]) / np.linalg.norm(outs["f32"])
  assert 0 < err("f32_residual") < 0.05 and 0 < err("bf16") < 0.05
  assert err("f32_residual") < err("bf16"), (err("f32_residual"), err("bf16"))
  with pytest.raises(ValueError, match="precision"):
    _ours(_tiny(precision="fp8"), weights)


def test_wan_config_without_precision_uses_dtype():
  # Exports written before the field: ``dtype`` sets the compute and the stream dtype.
  cfg = _tiny()
  del cfg.precision
  cfg.dtype = "bfloat16"
  model = jax.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  assert model.dtype == model.residual_dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- noise levels


def test_wan_sample_sigmas_schemes():
  key = jax.random.key(0)
  old = diffusion.shift_time(jax.random.uniform(key, (256, 4), jnp.float32), 5.0)
  per_frame = wan_mirage.sample_sigmas(key, 256, 4, 5.0, True, "per_frame")
  np.testing.assert_array_equal(per_frame[:, 1:], old[:, 1:])  # the reference's draw, unchanged
  assert float(jnp.abs(per_frame[:, 0]).max()) == 0
  per_example = wan_mirage.sample_sigmas(key, 256, 4, 5.0, True, "per_example")
  assert float(jnp.abs(per_example[:, 0]).max()) == 0  # the first frame stays clean
  assert float(jnp.abs(per_example[:, 1:] - per_example[:, 1:2]).max()) == 0
  assert float(jnp.std(per_example[:, 1])) > 0.1  # still one level per example, not per batch
  noisy_first = wan_mirage.sample_sigmas(key, 8, 4, 5.0, False, "per_example")
  assert float(jnp.abs(noisy_first - noisy_first[:, :1]).max()) == 0
  mixed = wan_mirage.sample_sigmas(key, 4000, 4, 1.0, True, "mixed", 0.25)
  together = float(jnp.mean(jnp.all(mixed[:, 1:] == mixed[:, 1:2], axis=1)))
  assert abs(together - 0.25) < 0.03
  with pytest.raises(ValueError, match="noise-level"):
    wan_mirage.sample_sigmas(key, 2, 2, 5.0, True, "per_chunk")


class _Spy:
  """Stands in for the DiT: records the timesteps and the text and predicts zeros."""

  def __init__(self):
    self.timesteps = self.text = None

  def __call__(self, latents, timesteps, text, **_):
    self.timesteps, self.text = np.asarray(timesteps), np.asarray(text)
    return jnp.zeros(latents.shape, jnp.float32)


@pytest.mark.parametrize("scheme", ["per_frame", "per_example"])
def test_wan_stage_sends_the_scheme_to_the_dit(scheme):
  """The noise-level scheme reaches the DiT's timesteps; and its text is the frozen
  empty-prompt embedding (a sentinel here, not zeros) for uncaptioned and dropped rows,
  the caption for the others."""
  config = mirage_wan22_5b.get_config("tiny")
  config.train.noise_levels = scheme
  config.data.batch_size = 4
  stage = wan_stage.WanStage(config, "abstract")
  batch = wan_memory_batch(stage)
  b = batch["target_latents"].shape[0]
  rng = np.random.default_rng(1)
  batch["text"] = jnp.asarray(rng.normal(size=(b, config.denoiser.text_len, stage.cfg.text_dim)),
                              jnp.float32)
  batch["has_text"] = jnp.asarray(np.arange(b) % 2 == 0)
  batch["reference_latents"] = jnp.zeros((b, 0) + batch["target_latents"].shape[2:])
  frozen = {k: jnp.zeros(v.shape, v.dtype) for k, v in stage.frozen.items() if k != "base"}
  sentinel = rng.normal(size=frozen["empty_text"].shape).astype(np.float32) + 7.0
  frozen["empty_text"] = jnp.asarray(sentinel)
  spy = _Spy()
  key = jax.random.key(2)
  loss, metrics = stage.loss(spy, frozen, batch, key)
  assert np.isfinite(float(loss))
  _, drop = stage.caption_text(batch["text"], batch["has_text"], frozen["empty_text"],
                               jax.random.split(key, 4)[2])  # the loss's own draw
  drop = np.asarray(drop)
  assert drop[1::2].all() and float(metrics["caption_dropped"]) == drop.mean()
  for row in range(b):
    np.testing.assert_array_equal(spy.text[row], sentinel if drop[row]
                                  else np.asarray(batch["text"][row]))
  r, t = stage.num_reference, stage.num_target
  target = spy.timesteps[:, r:r + t]
  assert np.all(target[:, 0] == 0)  # first frame clean under every scheme
  assert np.all(spy.timesteps[:, r + t:] == 0)  # preceding frames clean
  spread = np.abs(target[:, 1:] - target[:, 1:2]).max()
  assert (spread == 0) == (scheme == "per_example"), target


def test_wan_bad_noise_levels_config_is_named():
  config = mirage_wan22_5b.get_config("tiny")
  config.train.noise_levels = "per_chunk"
  with pytest.raises(InputError, match=r"config.train: field 'noise_levels'"):
    wan_stage.WanStage(config, "abstract")
  config.train.noise_levels = "mixed"
  config.train.noise_levels_mixed_prob = 1.5
  with pytest.raises(InputError, match=r"noise_levels_mixed_prob"):
    wan_stage.WanStage(config, "abstract")


# ----------------------------------------------------------------------------- caption dropout


def test_caption_dropout_replaces_the_fraction_p_with_the_empty_prompt():
  """config.denoiser.caption_dropout p (0.1 by default, the reference's): about p of the
  rows become the empty-prompt embedding exactly, the others stay the caption exactly; the
  same step key drops the same rows; a row without a caption is always the empty prompt."""
  config = mirage_wan22_5b.get_config("tiny")
  assert config.denoiser.caption_dropout == 0.1
  stage = wan_stage.WanStage(config, "abstract")
  n, lt, dim = 2000, config.denoiser.text_len, stage.cfg.text_dim
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(n, lt, dim)), jnp.float32)
  empty = jnp.asarray(rng.normal(size=(lt, dim)) + 3.0, jnp.float32)  # a sentinel, not zeros
  has = np.ones(n, bool)
  has[:50] = False
  fn = jax.jit(stage.caption_text)
  drops = []
  for seed in range(5):
    out, drop = (np.asarray(x) for x in fn(text, jnp.asarray(has), empty, jax.random.key(seed)))
    np.testing.assert_array_equal(out[drop], np.broadcast_to(empty, (drop.sum(), lt, dim)))
    np.testing.assert_array_equal(out[~drop], np.asarray(text)[~drop])
    assert drop[:50].all()
    drops.append(drop[50:])
  frac = np.mean(drops)  # 9750 draws: std 0.003
  assert abs(frac - 0.1) < 0.015, frac
  assert not np.array_equal(drops[0], drops[1])  # another key, other rows
  again = np.asarray(fn(text, jnp.asarray(has), empty, jax.random.key(0))[1])
  np.testing.assert_array_equal(again[50:], drops[0])  # deterministic given the key
  config.denoiser.caption_dropout = 1.5
  with pytest.raises(InputError, match="caption_dropout"):
    wan_stage.WanStage(config, "abstract")
