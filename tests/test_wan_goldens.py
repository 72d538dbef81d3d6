"""Wan DiT (+ VACE) against goldens made by the reference's own code.

diffusers cannot express Mirage's reference-frame RoPE (reference tokens at t positions
-R..-1, h positions h..2h-1) nor VACE under per-token timesteps, so for those the oracle is
the reference's ``model_fn_wan_video`` itself, run once by ``tests/goldens/make_wan_goldens.py``
(see its docstring: tiny random model in the original naming, f32, CPU) into
``tests/goldens/wan_reference.npz``. Here our ``WanDiT`` is built with the golden's sizes,
loaded from the golden's original-named weights through ``wan_dit.original_layout`` and run
on the same inputs; the pass criterion is max abs error <= 1e-4 * max|golden| in float32.
The goldens are stored channels-last in our layout, so nothing is transposed here.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax.families.wan import original_layout
from mirage_jax.families.wan import dit as wan_dit

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens", "wan_reference.npz")
CASES = ("refs", "refs_vace", "noref", "noref_vace")
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDENS, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  data["config"] = json.loads(str(data["config"]))
  return data


def _our_config(gcfg):
  """``wan_dit_config('tiny')`` with every size taken from the golden's reference config."""
  dit, vace = gcfg["dit"], gcfg["vace"]
  cfg = wan_dit.wan_dit_config("tiny")
  cfg.dim = dit["dim"]
  cfg.num_heads = dit["num_heads"]
  cfg.num_layers = dit["num_layers"]
  cfg.ffn_dim = dit["ffn_dim"]
  cfg.text_dim = dit["text_dim"]
  cfg.freq_dim = dit["freq_dim"]
  cfg.in_channels = dit["in_dim"]
  cfg.out_channels = dit["out_dim"]
  cfg.patch_size = tuple(dit["patch_size"])
  cfg.eps = dit["eps"]
  cfg.vace_layers = tuple(vace["vace_layers"])
  cfg.vace_in_channels = vace["vace_in_dim"]
  cfg.dtype = "float32"
  cfg.param_dtype = "float32"
  return cfg


def _load(model, layout, get):
  """Every parameter of ``model`` from original-named tensors, through ``layout``."""
  params = original_layout.load_params(layout, get)
  state = nnx.state(model, nnx.Param)
  flat = list(nnx.to_flat_state(state))
  ours = {tuple(str(p) for p in path) for path, _ in flat}
  assert ours == set(params), (
      f"layout vs model params: missing {sorted(ours - set(params))[:5]}, "
      f"extra {sorted(set(params) - ours)[:5]}")
  for path, var in flat:
    value = params[tuple(str(p) for p in path)]
    assert tuple(value.shape) == tuple(var.shape), (path, value.shape, var.shape)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  nnx.update(model, state)


@pytest.fixture(scope="module")
def model_and_layout(golden):
  cfg = _our_config(golden["config"])
  # Abstract build (no random init to pay for): every param is then set from the golden.
  model = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  layout = wan_dit.original_layout(cfg)
  _load(model, layout, lambda k: golden["w/" + k])
  return model, layout


def test_layout_uses_every_golden_weight(golden, model_and_layout):
  # A weight of the reference that our layout never reads would be silently random here.
  _, layout = model_and_layout
  used = {k for t in layout.values() for k in t.keys}
  stored = {k[2:] for k in golden if k.startswith("w/")}
  assert used == stored, (f"unused: {sorted(stored - used)}", f"unknown: {sorted(used - stored)}")


def _case_inputs(golden, case):
  r = int(golden[f"{case}/num_reference"])
  n_ref = golden["config"]["cases"]["refs"]["R"]
  latents = golden["inputs/latents"][:, n_ref - r:]
  vace = golden["inputs/vace"] if bool(golden[f"{case}/with_vace"]) else None
  return latents, golden[f"{case}/timesteps"], golden["inputs/text"], r, vace


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(golden, model_and_layout, case):
  model, _ = model_and_layout
  latents, timesteps, text, r, vace = _case_inputs(golden, case)
  want = golden[f"{case}/output"]
  got = model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text), num_reference=r,
              vace_context=None if vace is None else jnp.asarray(vace))
  got = np.asarray(jax.device_get(got), np.float64)
  assert got.shape == want.shape
  err = np.abs(got - want).max(axis=(2, 3, 4))  # (B, F): where it goes wrong, if it does
  scale = np.abs(want).max()
  assert err.max() <= REL_TOL * scale, (
      f"{case}: max err {err.max():.3e} > {REL_TOL} * {scale:.3f}; per (sample, frame):\n"
      f"{np.array2string(err, precision=2)}")


def test_goldens_discriminate(golden):
  # The cases must differ from one another by far more than the tolerance, or a model that
  # ignored the references or the VACE hints could pass.
  tol = REL_TOL * max(np.abs(golden[f"{c}/output"]).max() for c in CASES)
  n_ref = golden["config"]["cases"]["refs"]["R"]
  vace_effect = np.abs(golden["refs/output"] - golden["refs_vace/output"]).max()
  ref_effect = np.abs(golden["refs/output"][:, n_ref:] - golden["noref/output"]).max()
  assert vace_effect > 100 * tol and ref_effect > 100 * tol, (vace_effect, ref_effect, tol)
