"""Generation with estimated depth (a Depth Anything V2 export inside the chunk step), for
both families: Mirage's actual task, one frame and a camera path, without the future's
depth.

The depth networks are tiny and random (no released weights here): what is under test is
the plumbing (estimate -> align -> write, inside the one jitted step), that frame 0's given
depth sets the scale, that later frames are fitted to the memory's depth, and the command
line from a first-frame-only geometry file.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

from data_pipelines import files, procedural
from mirage_jax import families, rollout
from mirage_jax.depth import convert as depth_convert
from mirage_jax.depth import depth_anything
from mirage_jax.evaluation import revisit
from tests.test_generate import run_cli, save_tiny_export
from tests.test_wan_generate import NUM_FRAMES, RES, make_wan_export

pytest.importorskip("torch")  # make_wan_export writes the VAE as a torch .pth


def make_depth_export(directory: str, kind: str = "metric", seed: int = 0) -> str:
  """A random tiny Depth Anything V2 export (``convert.write_export``, as convert_depth)."""
  cfg = depth_anything.model_config("tiny", kind)
  model = depth_anything.DepthAnythingV2(cfg, rngs=nnx.Rngs(seed))
  params = {k: np.asarray(v) for k, v in _flat_items(nnx.state(model, nnx.Param).to_pure_dict())}
  path = os.path.join(directory, f"depth_{kind}")
  depth_convert.write_export(path, _nest(params), cfg, source="random tiny (test)")
  return path


def _flat_items(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat_items(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _nest(flat):
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


@pytest.fixture(scope="module")
def depth_export(tmp_path_factory):
  return make_depth_export(str(tmp_path_factory.mktemp("depth")))


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
  return rollout.load_world_model(make_wan_export(str(tmp_path_factory.mktemp("wan"))))


@pytest.fixture(scope="module")
def loop():
  c = procedural.render_clip(100003, NUM_FRAMES, RES, RES, trajectory="loop")
  return revisit.fit_clip(c, (RES, RES))


def _median_ratio(depths, truth):
  return float(np.median(depths / truth))


def test_wan_generates_a_loop_from_one_frame_with_estimated_depth(wan, depth_export, loop):
  config, vae, dit = wan
  wm_cls = families.world_model(config)
  make = lambda align: rollout.make_rollout(
      config, vae, dit, "mirage", capacity=NUM_FRAMES * 16,
      depth=wm_cls.depth_options("depth_anything", depth_export, align))
  r = make(None)
  assert not r.model.needs_depths and not r.model.needs_first_depth
  args = (loop["intrinsics"], loop["poses_c2w"])
  # Frame 0 alone, no depth at all: the metric estimate is frame 0's depth.
  out = r.generate(loop["frames"][0], None, *args, progress=False)
  lat = out["latent_frames"]
  assert out["frames"].shape == (NUM_FRAMES, RES, RES, 3)
  assert out["latent_depths"].shape == (len(lat), RES, RES)
  assert np.all(np.isfinite(out["latent_depths"])) and np.all(out["latent_depths"] > 0)
  assert out["coverage"][1:].max() > 0  # the memory was written with the estimate and read
  # Frame 0's depth given: it is written as given and sets the scale of what follows.
  given = r.generate(loop["frames"][0], loop["depths"][0], *args, progress=False)
  np.testing.assert_array_equal(given["latent_depths"][0], loop["depths"][0])
  aligned = given["depth_aligned"]
  assert not aligned[0] and aligned[1:].any(), aligned  # later latents fitted to the memory
  truth = loop["depths"][lat[1:]]
  raw = make(False).generate(loop["frames"][0], loop["depths"][0], *args, progress=False)
  # A random network's metres are far off; aligned to the given frame 0 and the memory,
  # the written depth is at the scene's scale.
  assert abs(np.log(_median_ratio(given["latent_depths"][1:], truth))) < np.log(1.5)
  assert abs(np.log(_median_ratio(raw["latent_depths"][1:], truth))) > np.log(2.0)
  assert not raw["depth_aligned"].any()
  # One compiled step for every chunk, as with the given depth.
  (fns,) = r._per_mesh.values()  # pylint: disable=protected-access
  assert fns["step"][False]._cache_size() == 1


def test_small_family_writes_the_estimated_depth_instead_of_its_decoders(tmp_path, depth_export):
  config, ae, dn = rollout.load_world_model(save_tiny_export(str(tmp_path)))
  clip = procedural.render_clip(5, 9, 32, 32, trajectory="loop")
  cls = families.world_model(config)
  outs = {}
  for name, opts in (("decoder", cls.depth_options()),
                     ("given", cls.depth_options("given")),
                     ("estimated", cls.depth_options(None, depth_export))):
    r = rollout.make_rollout(config, ae, dn, "voxel", depth=opts)
    extra = dict(depths=clip["depths"]) if r.model.needs_depths else {}
    outs[name] = r.generate(clip["frames"][0], clip["depths"][0], clip["intrinsics"],
                            clip["poses_c2w"], progress=False, **extra)
  # The given depth is what is written (and reported); the estimate differs from the
  # decoder's and from the truth, and frame 0 keeps its given depth.
  np.testing.assert_array_equal(outs["given"]["depths"], clip["depths"])
  est, dec = outs["estimated"]["depths"], outs["decoder"]["depths"]
  assert np.all(np.isfinite(est)) and np.all(est > 0)
  assert np.abs(est[1:] - dec[1:]).max() > 1e-3
  np.testing.assert_array_equal(est[0], clip["depths"][0])
  # Without frame 0's depth: refused for the decoder (the RGB-D encoder needs it), estimated
  # with a metric model.
  r = rollout.make_rollout(config, ae, dn, "voxel", depth=cls.depth_options(None, depth_export))
  out = r.generate(clip["frames"][0], None, clip["intrinsics"], clip["poses_c2w"], progress=False)
  assert np.all(out["depths"] > 0)
  with pytest.raises(Exception, match="depth"):
    rollout.make_rollout(config, ae, dn, "voxel").generate(
        clip["frames"][0], None, clip["intrinsics"], clip["poses_c2w"], progress=False)


def test_generate_cli_from_a_first_frame_only_file(tmp_path, depth_export):
  export = save_tiny_export(str(tmp_path))
  clip = procedural.render_clip(7, 6, 32, 32, trajectory="loop")
  path = tmp_path / "geometry.npz"
  files.save_first_frame_geometry(path, dict(clip, has_depth=False))
  out = tmp_path / "out"
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={path}",
                   f"--output_dir={out}", "--memory=voxel", f"--depth_model={depth_export}")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out / "depth.npz") as d:
    assert d["depths"].shape == (6, 32, 32) and np.all(d["depths"] > 0)
  # A relative model cannot give frame 0 metric depth: one line naming the field.
  rel = make_depth_export(str(tmp_path), "relative")
  bad = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={path}",
                f"--output_dir={tmp_path / 'out2'}", f"--depth_model={rel}")
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "field 'depth'" in bad.stderr.strip().splitlines()[-1]
  assert "Traceback" not in bad.stderr
  assert not (tmp_path / "out2").exists() or not os.listdir(tmp_path / "out2")


def test_batched_trajectories_align_independently(tmp_path, depth_export):
  """Two trajectories of different lengths in one batch (one vmapped, jitted step) write the
  same estimated depth as each alone: the fit is per trajectory, carried in its own row."""
  config, ae, dn = rollout.load_world_model(save_tiny_export(str(tmp_path)))
  cls = families.world_model(config)
  r = rollout.make_rollout(config, ae, dn, "voxel", depth=cls.depth_options(None, depth_export))
  clips = [procedural.render_clip(s, n, 32, 32, trajectory="loop") for s, n in ((21, 9), (22, 6))]
  args = ([c["frames"][0] for c in clips], [c["depths"][0] * (1 + i) for i, c in enumerate(clips)],
          [c["intrinsics"] for c in clips], [c["poses_c2w"] for c in clips])
  both = r.generate_batch(*args, seeds=[0, 1], progress=False)
  alone = r.generate_batch(*[[a[1]] for a in args], seeds=[1], progress=False)
  np.testing.assert_allclose(both[1]["depths"], alone[0]["depths"], rtol=1e-5, atol=1e-5)
  # Frame 0's given depth (doubled for the second) sets each row's own scale.
  ratio = [np.median(o["depths"][1:] / c["depths"][1:]) for o, c in zip(both, clips)]
  assert ratio[1] > 1.3 * ratio[0], ratio
