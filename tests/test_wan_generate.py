"""Generation and evaluation with a Wan-family export (tiny, random, made by convert_wan).

The export is converted from random weights in the released (original) layout, with the
reference's chunking (33 video frames, then 32 new) at 64x64 (latent 4x4) and 2 sampler
steps to keep CPU time low; trajectories of 37 = 1 + 4 * 9 frames take two chunks, the
second padded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import files, procedural
from mirage_jax import rollout
from mirage_jax.errors import InputError
from mirage_jax import checkpoint, families
from mirage_jax.families.wan import convert as wan_convert
from mirage_jax import weight_files
from mirage_jax.families.wan import world_model as wan_world_model
from mirage_jax.evaluation import revisit
from mirage_jax.families.wan import original_layout
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import vae as wan_vae
from tests.test_generate import save_tiny_export
from tests.conftest import xla_flags

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 64
NUM_FRAMES = 37  # chunk 0: frames 0..32 (9 latents); chunk 1: 33..36 (1 real latent of 8)


def _configs():
  from experiments import wan22_ti2v_5b  # pylint: disable=g-import-not-at-top
  out = []
  for stage in ("autoencoder", "denoiser"):
    c = wan22_ti2v_5b.get_config(f"{stage},tiny")
    c.data.resolution = (RES, RES)
    c.denoiser.target_frames = 33
    c.denoiser.preceding_frames = 8
    c.denoiser.reference_frames = 2
    c.denoiser.reference_bank = 16
    c.sampler.num_steps = 2
    c.memory.backend = "voxel"
    out.append(c)
  return tuple(out)


def make_wan_export(directory: str, seed: int = 0) -> str:
  """Random tiny Wan2.2 files in the original naming -> ``wan_convert.convert`` -> exports; returns
  the DiT export's path (its VAE export beside it)."""
  cfg = wan_dit.wan_dit_config("tiny")
  dit_layout = wan_dit.original_layout(cfg)
  for group in ("dit", "vace"):
    weight_files.write_safetensors(
        os.path.join(directory, f"{group}.safetensors"),
        original_layout.random_original(dit_layout, seed,
                                        keep=lambda k, g=group: wan_dit.key_group(k) == g))
  vae = original_layout.random_original(
      wan_vae.original_layout(wan_vae.wan_vae_config("tiny")), seed + 1)
  torch.save({k: torch.from_numpy(v) for k, v in vae.items()}, os.path.join(directory, "vae.pth"))
  out = os.path.join(directory, "export")
  wan_convert.convert(out, dit=os.path.join(directory, "dit.safetensors"),
                      vae=os.path.join(directory, "vae.pth"),
                      vace=os.path.join(directory, "vace.safetensors"), variant="tiny",
                      configs=_configs())
  return os.path.join(out, "dit")


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=None)


def _one_line_error(result, where: str, field: str) -> None:
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: {where}: field '{field}'"), lines[-1]
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return make_wan_export(str(tmp_path_factory.mktemp("wan")))


@pytest.fixture(scope="module")
def world(export):
  return rollout.load_world_model(export)


@pytest.fixture(scope="module")
def clip():
  c = procedural.render_clip(100001, NUM_FRAMES, RES, RES, trajectory="loop")
  return revisit.fit_clip(c, (RES, RES))


@pytest.fixture(scope="module")
def geometry_npz(tmp_path_factory):
  c = procedural.render_clip(7, NUM_FRAMES, RES, RES, trajectory="loop")
  path = tmp_path_factory.mktemp("clip") / "geometry.npz"
  files.save_geometry_npz(path, c)
  return str(path)


@pytest.fixture(scope="module")
def mirage_rollout(world):
  config, vae, dit = world
  return rollout.make_rollout(config, vae, dit, "mirage", capacity=NUM_FRAMES * 16)


def _generate(r, clip, **kw):
  return r.generate(clip["frames"][0], clip["depths"][0], clip["intrinsics"], clip["poses_c2w"],
                    depths=clip["depths"], progress=False, **kw)


# ----------------------------------------------------------------------------- loading


def test_load_dispatches_on_family(world):
  config, vae, dit = world
  assert families.family_name(config) == "wan"
  assert isinstance(vae, wan_vae.WanVAE) and isinstance(dit, wan_dit.WanDiT)
  assert dit.vace is not None
  m = families.world_model(config).memory_config(config)
  assert (m.image_height, m.latent_height, m.latent_channels) == (RES, RES // 16, 48)
  st = wan_world_model.wan_settings(config)
  assert (st.chunk_frames, st.latents, st.new_frames, st.preceding_latents) == (33, 9, 32, 2)
  r = rollout.make_rollout(config, vae, dit, "mirage")
  assert [list(p) for p in r.model.plan(NUM_FRAMES)] == [list(range(0, 33, 4)), list(range(32, 65, 4))]
  with pytest.raises(Exception, match="family"):
    families.world_model("small")(config, vae, dit)  # the small family refuses a Wan config


# ----------------------------------------------------------------------------- CLI


def test_generate_cli_end_to_end(export, geometry_npz, tmp_path):
  out = tmp_path / "out"
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}",
                   f"--geometry_path={geometry_npz}", f"--output_dir={out}", "--memory=mirage")
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == ["cameras.npz", "timings.json", "video.gif", "video.mp4"]
  frames = iio.imread(out / "video.mp4", index=None)
  assert frames.shape == (NUM_FRAMES, RES, RES, 3)
  timings = json.loads((out / "timings.json").read_text())
  assert timings["family"] == "wan" and timings["backend"] == "mirage"
  assert timings["chunk_frames"] == 33 and len(timings["chunks"]) == 2
  assert timings["guidance_scale"] == 0.0  # no CFG by default
  assert timings["num_references"][0] == 0 and 0 <= timings["num_references"][1] <= 2
  cams = np.load(out / "cameras.npz")
  # Every generated latent written at the last frame of its group: 0, 4, ..., 32 (chunk 0),
  # then 36 (the only real latent of the padded chunk 1).
  np.testing.assert_array_equal(cams["latent_frames"], list(range(0, 33, 4)) + [36])
  cov = cams["coverage"]
  assert cov.shape == (NUM_FRAMES, RES // 16, RES // 16) and cov[0].min() == 1.0
  assert np.all((cov >= 0) & (cov <= 1)) and cov[1:].mean() > 0  # the memory was read
  # Append-only cloud: the first frame (16 latent cells), 9 latents, then 1 more latent.
  c0, c1 = timings["chunks"][0]["cache_bytes"], timings["chunks"][1]["cache_bytes"]
  assert c1 == timings["cache_bytes"] and c0 > 0
  assert c1 * 10 == c0 * 11


def test_evaluate_revisit_cli(export, tmp_path):
  out = tmp_path / "eval"
  result = run_cli("mirage_jax.evaluate", f"--checkpoint={export}", "--benchmark=revisit",
                   "--procedural_seeds=100001:100003", f"--num_frames={NUM_FRAMES}",
                   "--backends=none,mirage", f"--output_dir={out}", "--novideos",
                   "--trajectory_batch=2")  # both loops in one batched chunk step
  assert result.returncode == 0, result.stderr
  metrics = json.loads((out / "metrics.json").read_text())
  rows = metrics["revisit"]["summary"]
  assert {"none", "mirage", "oracle", "composite"} <= set(rows)
  assert sorted(metrics["revisit"]["trajectories"]) == ["seed100001", "seed100002"]
  traj = metrics["revisit"]["trajectories"]["seed100001"]
  assert traj["num_frames"] == NUM_FRAMES and traj["revisit_frames"] > 0
  for row in ("none", "mirage", "oracle"):
    scores = traj["rows"][row]
    assert np.isfinite(scores["psnr_all"]) and 0 <= scores["ssim_all"] <= 1
    assert "geometric_psnr" not in scores  # the Wan VAE generates no depth to score
  assert traj["rows"]["none"]["coverage_revisit"] == 0.0
  assert traj["rows"]["mirage"]["coverage_revisit"] > 0.0


# ----------------------------------------------------------------------------- behaviour


def test_memory_reaches_the_dit_through_vace(world, mirage_rollout, clip):
  config, vae, dit = world
  r = mirage_rollout
  first = r.model.encode(clip["frames"][:1])[0]
  rng = np.random.default_rng(0)
  empty = jnp.zeros((9, 4, 4, 48))
  full = jnp.asarray(rng.standard_normal((9, 4, 4, 48)), jnp.float32)
  # The VACE input is [memory | control]: the memory's 48 channels, then the same control.
  v0, v1 = r.model.vace_input(empty), r.model.vace_input(full)
  assert v0.shape == (1, 9, 4, 4, 96)
  np.testing.assert_array_equal(v1[0, ..., :48], full)
  np.testing.assert_array_equal(v0[..., 48:], v1[..., 48:])
  key = jax.random.key(3)
  a = r.model.sample_chunk(key, first, empty)
  b = r.model.sample_chunk(key, first, full)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  np.testing.assert_array_equal(a[0], first)  # the clean first latent is kept
  assert float(jnp.max(jnp.abs(a[1:] - b[1:]))) > 1e-3  # the memory changes the sample

  # With every VACE after_proj zero the hints are zero: the memory cannot matter.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(dit)
  dead = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  proj = dead.vace.blocks.after_proj
  proj.kernel.set_value(jnp.zeros_like(proj.kernel.get_value()))
  proj.bias.set_value(jnp.zeros_like(proj.bias.get_value()))
  r0 = rollout.make_rollout(config, vae, dead, "mirage")
  a0, b0 = r0.model.sample_chunk(key, first, empty), r0.model.sample_chunk(key, first, full)
  np.testing.assert_array_equal(a0, b0)
  assert float(jnp.max(jnp.abs(a0[1:] - a[1:]))) > 1e-3  # and the hints did matter before


def test_rollout_memory_and_determinism(world, mirage_rollout, clip):
  config, vae, dit = world
  r = mirage_rollout
  out = _generate(r, clip, seed=0, timed=True)
  again = _generate(r, clip, seed=0)
  other = _generate(r, clip, seed=1)
  assert out["frames"].shape == (NUM_FRAMES, RES, RES, 3) and out["depths"] is None
  np.testing.assert_array_equal(out["frames"], again["frames"])
  assert np.abs(out["frames"].astype(int) - other["frames"].astype(int)).max() > 0
  # Fixed shapes: every chunk (the first, later ones, any number of references) is one
  # compiled step.
  (fns,) = r._per_mesh.values()  # pylint: disable=protected-access
  assert fns["step"][False]._cache_size() == 1
  # Frame 0 is the decoded first-frame latent (decoded alone here, first of 9 in the chunk:
  # another compiled program, so the last float bit may differ and flip a truncation).
  lat0 = r.model.encode(clip["frames"][:1])
  rgb0 = np.asarray(r.model.decode(lat0))[0]
  want = np.floor((np.clip(rgb0, -1, 1) + 1) * 127.5).astype(int)
  assert np.abs(out["frames"][0].astype(int) - want).max() <= 1
  assert np.mean(out["frames"][0] == want) > 0.99
  assert np.all(np.isfinite(rgb0))
  # Memory: chunk 0 read only the first frame's points, chunk 1 reads what chunk 0 wrote.
  assert out["timings"][1].cache_bytes > out["timings"][0].cache_bytes
  # Without memory nothing is covered and the frames differ from the mirage row's.
  none = _generate(rollout.make_rollout(config, vae, dit, "none"), clip, seed=0)
  assert none["coverage"][1:].max() == 0.0 and out["coverage"][1:].max() > 0.0
  assert np.abs(none["frames"].astype(int) - out["frames"].astype(int)).max() > 0


def test_rgb_points_read_is_the_vae_encoding_of_the_rendered_video(world, clip):
  """The pixel baseline: frame 0 kept as RGB points, rendered into every video frame's
  camera of a chunk (the first 17 see it, the last 16 look away) and encoded by the Wan VAE:
  the covered latents are the encoding of exactly that video (frame 0, then black)."""
  config, vae, dit = world
  r = rollout.make_rollout(config, vae, dit, "rgb_points", capacity=RES * RES)
  be = r.backend
  frame0 = clip["frames"][:1]
  state = be.write(be.init(r.memory_cfg), jnp.zeros((1, 4, 4, 48)), clip["depths"][:1],
                   clip["intrinsics"][:1], clip["poses_c2w"][:1], np.ones((1, RES, RES), bool),
                   np.zeros((1,), np.int32), rgb=frame0.astype(np.float32) / 255.0)
  away = clip["poses_c2w"][0].copy()
  away[:3, [0, 2]] *= -1  # turned around in place: frame 0's points are behind it
  c2w = np.stack([clip["poses_c2w"][0]] * 17 + [away] * 16)
  lat, cov = jax.jit(be.read)(state, np.repeat(clip["intrinsics"][:1], 33, 0), c2w)
  assert lat.shape == (9, 4, 4, 48) and cov.shape == (9, 4, 4)
  # Latent 0 <- frame 0, latent k <- frames 4k-3..4k: latents 0..4 see frame 0 only.
  assert cov[:5].all() and not cov[5:].any()
  np.testing.assert_array_equal(lat[5:], 0.0)
  video = np.concatenate([np.repeat(frame0, 17, 0), np.zeros((16, RES, RES, 3), np.uint8)])
  want = np.asarray(r.model.encode(video))
  # (the memory's latents are stored in its feature dtype, bf16 here)
  np.testing.assert_allclose(np.asarray(lat[:5], np.float32), want[:5], rtol=1e-2, atol=1e-2)
  # ... and not that of another video (the read is the render's encoding, not a stand-in).
  assert np.abs(np.asarray(r.model.encode(clip["frames"][:33]))[:5] - want[:5]).max() > 0.1


@pytest.mark.slow  # one Wan chunk step compiled (render + VAE encode inside)
def test_scaling_runs_the_wan_rollout_with_rgb_points(world):
  """``--benchmark=scaling`` on a Wan export: the rgb_points rollout (render + VAE encode
  per chunk, timed read + write) and its cache: every pixel of every written latent frame.
  Chunks of 5 video frames (2 latents), no references, to keep the compile small."""
  import copy  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import scaling  # pylint: disable=g-import-not-at-top
  config, vae, dit = world
  config = copy.deepcopy(config)
  config.denoiser.update(target_frames=5, preceding_frames=4, reference_frames=0)
  (entry,) = scaling.run_scaling(config, vae, dit, ["rgb_points"], [13], timed_chunks=1)
  assert entry["backend"] == "rgb_points" and entry["frames"] == 13
  assert entry["memory_seconds_per_chunk"] > 0 and entry["chunk_seconds"] > 0
  # 13 frames: 1 pre-filled (frame 0..3 of the loop, one write per 4 frames), then frame 0
  # twice and one latent per chunk of 4 new frames; each a 64x64 frame of points (position
  # f32 x 3, colour u8 x 3, valid flag).
  assert entry["cache_bytes"] == (1 + 2 + 2) * RES * RES * (12 + 3 + 1)
  with pytest.raises(InputError, match="lengths"):  # shorter than warm-up + timed chunks
    scaling.run_scaling(config, vae, dit, ["voxel"], [8], timed_chunks=1)


def test_chunks_chain_as_the_reference(world, clip):
  """What each chunk is given: chunk 1 starts from chunk 0's last latent, its preceding
  latents are the two before it with the memory reads they were generated with, and its
  memory read sees what chunk 0 wrote (the sampler replaced by a recorder inside the jitted
  chunk step: the inputs are its fixed-shape slots, padding marked by the frame mask)."""
  config, vae, dit = world
  r = rollout.make_rollout(config, vae, dit, "mirage", capacity=NUM_FRAMES * 16)
  R, L, P = r.model.num_references, r.model.settings.latents, r.model.settings.preceding_latents
  calls = []

  def record(dit_state, noise, first, references, preceding, vace, text, empty_text,
             frame_mask=None):
    lat = noise.at[:, :1].set(first)
    jax.debug.callback(lambda *a: calls.append([np.asarray(x)[0] for x in a]), first,
                       references, preceding, vace, frame_mask, lat)
    return lat

  r.model._sample_impl = record  # pylint: disable=protected-access
  out = _generate(r, clip, seed=0)
  keys = ("first", "references", "preceding", "vace", "mask", "out")
  c0, c1 = (dict(zip(keys, c)) for c in calls)
  for c in (c0, c1):
    c["first"], c["scene"] = c["first"][0], c["vace"][:L, ..., :48]
    c["preceding_scene"] = c["vace"][L:, ..., :48]
  # Encoded inside the jitted step: float32 rounding apart from the eager encode.
  np.testing.assert_allclose(c0["first"], r.model.encode(clip["frames"][:1])[0], atol=1e-5)
  assert not c0["mask"][:R].any() and not c0["mask"][R + L:].any()  # all padding
  # Chunk 0 reads only the first frame's points: its own camera is fully covered.
  assert np.all(c0["scene"][0] != 0)
  np.testing.assert_array_equal(c1["first"], c0["out"][8])
  assert c1["mask"][R + L:].all()  # two real preceding latents, oldest first
  np.testing.assert_array_equal(c1["preceding"], c0["out"][6:8])
  np.testing.assert_array_equal(c1["preceding_scene"], c0["scene"][6:8])
  # Chunk 1's memory reads are cells of the latents written so far (the first frame and
  # chunk 0's nine, stored as feature_dtype), and chunk 0's writes changed what is read.
  dtype = jnp.dtype(families.world_model(config).memory_config(config).feature_dtype)
  written = np.asarray(jnp.concatenate([c0["first"][None], c0["out"]]).astype(dtype)
                       .astype(jnp.float32)).reshape(-1, 48)
  cells = np.asarray(c1["scene"]).reshape(-1, 48)
  cells = cells[np.any(cells != 0, axis=1)]
  assert len(cells) > 0
  assert all(np.any(np.all(written == c, axis=1)) for c in cells)
  assert np.any(c1["scene"][0] != c0["scene"][8])  # same camera, more memory
  # References: the real ones right-aligned against the target, best first.
  n = int(c1["mask"][:R].sum())
  np.testing.assert_array_equal(c1["mask"][:R], np.arange(R) >= R - n)
  assert out["num_references"] == [0, n]


def test_cfg_uses_the_empty_prompt(world, clip):
  config, vae, dit = world
  text = np.random.default_rng(1).standard_normal((7, int(config.denoiser.model.text_dim)))
  base = rollout.make_rollout(config, vae, dit, "mirage", sampling_options=dict(text=text))
  cfg = rollout.make_rollout(config, vae, dit, "mirage",
                             sampling_options=dict(text=text, guidance_scale=3.0))
  assert base.model.guidance_scale is None and cfg.model.guidance_scale == 3.0
  np.testing.assert_array_equal(base.model.text[0, :7], text.astype(np.float32))
  assert not np.any(base.model.text[0, 7:]) and not np.any(base.model.empty_text)  # zero-padded, zeros
  first = base.model.encode(clip["frames"][:1])[0]
  scene = jnp.zeros((9, 4, 4, 48))
  key = jax.random.key(0)
  a, b = base.model.sample_chunk(key, first, scene), cfg.model.sample_chunk(key, first, scene)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  # CFG with the caption equal to the empty prompt is the conditional prediction again.
  same = rollout.make_rollout(config, vae, dit, "mirage",
                              sampling_options=dict(text=text, empty_text=text, guidance_scale=3.0))
  np.testing.assert_allclose(same.model.sample_chunk(key, first, scene), a, atol=1e-5)


def test_promptless_run_uses_the_empty_prompt(world, tmp_path):
  """No --caption_embedding: the text is the empty prompt's embedding (as the reference)."""
  config, vae, dit = world
  empty = np.random.default_rng(2).standard_normal((3, int(config.denoiser.model.text_dim)))
  np.save(tmp_path / "empty.npy", empty.astype(np.float32))
  options = wan_world_model.rollout_options(config, None, str(tmp_path / "empty.npy"), None)
  assert options["text"] is None
  r = rollout.make_rollout(config, vae, dit, "mirage", sampling_options=options)
  np.testing.assert_array_equal(r.model.text, r.model.empty_text)
  np.testing.assert_array_equal(r.model.text[0, :3], empty.astype(np.float32))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
  return save_tiny_export(str(tmp_path_factory.mktemp("small")))


def test_bad_inputs_are_one_line(export, small_export, geometry_npz, tmp_path):
  out = str(tmp_path / "out")
  gen = lambda *a: run_cli("mirage_jax.generate", f"--geometry_path={geometry_npz}",
                           f"--output_dir={out}", *a)
  caption = tmp_path / "caption.npy"
  np.save(caption, np.zeros((5, 32), np.float32))
  # A Wan-only flag on a small-family export.
  _one_line_error(gen(f"--checkpoint={small_export}", f"--caption_embedding={caption}"),
                  "--caption_embedding", "caption_embedding")
  _one_line_error(gen(f"--checkpoint={small_export}", "--guidance_scale=2"),
                  "--guidance_scale", "guidance_scale")
  # A missing caption file, one of the wrong text width.
  missing = tmp_path / "nope.npy"
  _one_line_error(gen(f"--checkpoint={export}", f"--caption_embedding={missing}"),
                  str(missing), "caption_embedding")
  wide = tmp_path / "wide.npy"
  np.save(wide, np.zeros((5, 33), np.float32))
  _one_line_error(gen(f"--checkpoint={export}", f"--empty_text_embedding={wide}"),
                  str(wide), "empty_text_embedding")
  # The small family's autoencoder under a Wan DiT, and the other way round.
  small_ae = checkpoint.export_config(small_export).denoiser.autoencoder_checkpoint
  _one_line_error(gen(f"--checkpoint={export}", f"--autoencoder={small_ae}"),
                  small_ae, "family")
  wan_vae_export = os.path.join(os.path.dirname(export), "vae")
  _one_line_error(gen(f"--checkpoint={small_export}", f"--autoencoder={wan_vae_export}"),
                  wan_vae_export, "family")
  # Moving-content handling the Wan family does not have.
  _one_line_error(gen(f"--checkpoint={export}", "--object_slots"), "--object_slots", "object_slots")
  # No depth in the file: the Wan rollout has nothing to write its memory with.
  no_depth = tmp_path / "no_depth.npz"
  data = dict(np.load(geometry_npz))
  data["has_depth"] = np.bool_(False)
  np.savez(no_depth, **data)
  _one_line_error(gen(f"--checkpoint={export}", f"--geometry_path={no_depth}"),
                  str(no_depth), "depth")
  # Frame 0's depth only: the Wan rollout writes every frame with its given depth.
  first_only = tmp_path / "first_only.npz"
  data = dict(np.load(geometry_npz))
  np.savez(first_only, frames=data["frames"][:1], depths=data["depths"][:1],
           intrinsics=data["intrinsics"], poses_c2w=data["poses_c2w"])
  result = gen(f"--checkpoint={export}", f"--geometry_path={first_only}")
  _one_line_error(result, str(first_only), "depth")
  assert "--depth_estimator=given" in result.stderr
  # evaluate: a small-family benchmark refuses a Wan export before loading it.
  ev = run_cli("mirage_jax.evaluate", f"--checkpoint={export}", "--benchmark=objects",
               f"--output_dir={tmp_path / 'ev'}")
  _one_line_error(ev, "--benchmark", "benchmark")
