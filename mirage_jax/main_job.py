"""The main job: fresh clone -> dataset -> tiny model -> revisit videos -> benchmark table.

  python -m mirage_jax.main_job --workdir=runs/tiny [--config=experiments/tiny_cpu.py]

Stages, each skipped when its output already exists (a second run reuses them; an
interrupted training run resumes from its last checkpoint):

  1. build the procedural dataset (TFDS ArrayRecord under ``<workdir>/data``);
  2. train the RGB-D autoencoder, export it (``<workdir>/autoencoder_export``);
  3. train the denoiser on the frozen autoencoder, export it (``<workdir>/denoiser_export``);
  3b. with ``--train_baselines=none,frame_bank``: the same denoiser trained (same data,
     steps, sampler) without memory and with the frame bank (``<workdir>/denoiser_<b>_export``);
  4. generate held-out loop trajectories with ``none``, ``mirage`` and ``voxel`` memory (and
     the trained baselines' rows ``none (trained)``, ``frame_bank (trained)``) and score
     revisits and first-visit frames, then measure cache bytes and time per chunk vs trajectory length, then
     score held-out loops with moving objects (``mirage``, ``voxel`` without and with object
     slots: ghosting, object re-entry); print the tables and the paths of the videos and
     plots (``<workdir>/eval``), and last the report: ``<workdir>/eval/index.html`` (every
     claim's PASS/FAIL, links to each evaluation's ``index.html`` with its videos).

A config trained on Memory Maze (``data.dataset='memory_maze'``, e.g.
``--config=experiments/tiny_cpu.py:memory_maze``; needs the ``memory_maze`` extra) builds
Memory Maze clips in stage 1 and runs the Memory Maze protocol as stage 4 instead
(``evaluate --benchmark=memory_maze``: ``--memory_maze_context`` frames given, as many
generated, on the held-out ``--memory_maze_seeds``; ``evaluation/memory_maze_protocol.py``).

``--family=wan`` runs the Wan-family pipeline instead: the Wan2.2 architecture at tiny widths
(``experiments/wan_tiny_cpu.py``), every network trained here, on a CPU:

  python -m mirage_jax.main_job --family=wan --workdir=runs/wan_tiny

  1. the procedural rooms at 128x128 (``<workdir>/data``);
  2. the Wan VAE trained from scratch (L1 + KL) and exported with its own latent statistics
     (``<workdir>/vae_export``);
  3. the dataset encoded by it to latent clips (``<workdir>/latents``);
  4. the Wan DiT trained from scratch on them, without memory (``<workdir>/dit_export``);
  5. Mirage's VACE + LoRA fine-tuned on that frozen DiT (``<workdir>/denoiser_export``);
  6. held-out loop trajectories generated and scored by the revisit benchmark, with the
     pretrained DiT alone as the baseline trained without memory (row ``none (trained)``);
     the table, each memory's per-loop gain over it, and the claims.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import subprocess
import sys
import time

from absl import flags, logging

from mirage_jax import paths
from mirage_jax.errors import InputError, load_config_file, run_app
from mirage_jax.evaluation import lpips

# The experiment configs the job runs, loaded by path (the library does not import experiments/).
_EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "experiments")

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Everything this job writes goes here.")
_CONFIG = flags.DEFINE_string("config", "experiments/tiny_cpu.py",
                              "Experiment config file; its get_config(stage) gives both stages.")
_BACKENDS = flags.DEFINE_list("backends", ["none", "mirage", "voxel"], "Memory backends to compare.")
_NUM_TRAJECTORIES = flags.DEFINE_integer("num_trajectories", 8, "Held-out loop trajectories to score.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 48, "Frames per held-out loop trajectory.")
_HELDOUT_SEED = flags.DEFINE_integer("heldout_seed", 100_000, "First seed of the held-out loops "
                                     "(the training dataset uses seeds from 0).")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "1024"], "Trajectory lengths for the cost table.")
_OBJECT_TRAJECTORIES = flags.DEFINE_integer("object_trajectories", 8,
                                            "Held-out loops with moving objects to score (0 = skip).")
_OBJECT_SEED = flags.DEFINE_integer("object_seed", 200_000, "First seed of those loops.")
_OBJECT_FRAMES = flags.DEFINE_integer(
    "object_frames", 96, "Frames per loop with moving objects, the first half given (at 48 "
    "frames about half of the loops have no object re-entry to score).")
_AE_STEPS = flags.DEFINE_integer("autoencoder_steps", None, "Override the config's autoencoder steps.")
_DN_STEPS = flags.DEFINE_integer("denoiser_steps", None, "Override the config's denoiser steps.")
_FAMILY = flags.DEFINE_enum("family", "small", ["small", "wan"],
                            "'small': the RGB-D autoencoder + denoiser pipeline (--config); 'wan': "
                            "the tiny Wan2.2 fine-tuning pipeline (experiments/mirage_wan22_5b.py:tiny).")
_TRAIN_BASELINES = flags.DEFINE_list(
    "train_baselines", [], "Memory backends to train a baseline denoiser with, besides the "
    "memory model: 'none' (trained without memory), 'frame_bank' (WorldMem-style: the past "
    "frame of most view overlap reprojected into the condition, no 3D cache); same data, steps "
    "and sampler. Their rows 'none (trained)', 'frame_bank (trained)' join the revisit "
    "benchmark and the claims compare against 'none (trained)'. Off by default: each costs a "
    "denoiser training (~20 min at the tiny config's 2400 steps on 2 CPU cores).")
_MORE_STEPS = flags.DEFINE_integer(
    "more_sampler_steps", 0, "N > 0: the revisit benchmark once more with N sampler steps "
    "(every row; <workdir>/eval/revisit_steps<N>), beside the configured steps.")
_MAZE_CONTEXT = flags.DEFINE_integer(
    "memory_maze_context", 100, "A config trained on Memory Maze (data.dataset='memory_maze'): "
    "stage 4 is the Memory Maze protocol (evaluate --benchmark=memory_maze) with N given and N "
    "generated frames.")
_MAZE_SEEDS = flags.DEFINE_string("memory_maze_seeds", "1000000:1000004",
                                  "a:b held-out maze seeds of that protocol.")
# LPIPS of the revisit, objects and Memory Maze evaluations (passed on to evaluate).
_LPIPS = lpips.define_flags()
_WAN_CLIPS = flags.DEFINE_integer("wan_clips", None, "--family=wan: procedural training clips "
                                  "(default: experiments/wan_tiny_cpu.py's).")
_WAN_BASE_STEPS = flags.DEFINE_integer("wan_base_steps", None, "--family=wan: steps of the Wan "
                                       "DiT's pretraining (default: the config's).")
_WAN_SAMPLER_STEPS = flags.DEFINE_integer("wan_sampler_steps", None, "--family=wan: sampler "
                                          "steps of the exported model (default: the config's).")


def load_configs(path: str, workdir: str):
  """(autoencoder config, denoiser config) from an experiment file, paths under ``workdir``.

  ``path`` may name a variant, ``FILE:VARIANT``: the stages are then ``get_config('<stage>,VARIANT')``
  (e.g. ``experiments/tiny_cpu.py:memory_maze``).
  """
  path, _, variant = path.partition(":")
  module = load_config_file(path, "--config")
  configs = []
  for stage in ("autoencoder", "denoiser"):
    try:
      c = module.get_config(f"{stage},{variant}" if variant else stage)
    except ValueError as e:  # an unknown variant
      raise InputError("--config", "config", str(e)) from None
    c.data.data_dir = os.path.join(workdir, "data")
    configs.append(c)
  ae, dn = configs
  dn.denoiser.autoencoder_checkpoint = os.path.abspath(os.path.join(workdir, "autoencoder_export"))
  if _AE_STEPS.value:
    ae.train.steps = _AE_STEPS.value
  if _DN_STEPS.value:
    dn.train.steps = _DN_STEPS.value
  return ae, dn


def _banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def train_and_export(config, workdir: str, name: str, update_config=None) -> str:
  """Trains ``config.stage`` into ``<workdir>/<name>`` (resuming) and exports it once
  (``update_config``: see ``checkpoint.export_params``)."""
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import loop  # pylint: disable=g-import-not-at-top
  export_dir = os.path.join(workdir, f"{name}_export")
  if os.path.isdir(export_dir):
    print(f"reusing {export_dir}")
    return export_dir
  t0 = time.time()
  metrics = loop.train_and_evaluate(config, os.path.join(workdir, name))
  step = checkpoint.export_params(os.path.join(workdir, name), export_dir,
                                  update_config=update_config)
  if step < config.train.steps:
    # Preempted (SIGTERM: the loop saved and returned): a partial model must not be exported,
    # or the next run would reuse it instead of resuming.
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(export_dir)
    print(f"{name}: stopped at step {step} of {config.train.steps} (preempted); run the same "
          "command again to resume", flush=True)
    raise SystemExit(143)  # 128 + SIGTERM
  print(f"{name}: {config.train.steps} steps in {time.time() - t0:.0f} s; last metrics "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
  print(f"exported {export_dir}")
  return export_dir


def _main() -> int:
  # INFO carries training progress (loss, ETA); the libraries' INFO chatter is not ours.
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OurInfoOnly())
  workdir = _WORKDIR.value
  # It runs commands in local sub-folders (datasets, exports, reports) of the workdir.
  paths.require_local(workdir, "--workdir", "run mirage_jax.main for a gs:// workdir")
  os.makedirs(workdir, exist_ok=True)
  if _FAMILY.value == "wan":
    return _main_wan(workdir)
  ae_config, dn_config = load_configs(_CONFIG.value, workdir)
  maze = ae_config.data.dataset == "memory_maze"
  if maze:  # before any stage: a missing extra is one line, not a traceback on a worker
    from data_pipelines import memory_maze  # pylint: disable=g-import-not-at-top
    memory_maze.require("--config")
  common = load_config_file(os.path.join(_EXPERIMENTS, "common.py"), "--config")
  try:
    baseline_configs = {b: common.memory_baseline(dn_config, b) for b in _TRAIN_BASELINES.value}
  except InputError as e:  # name the flag
    raise InputError("--train_baselines", "train_baselines", e.problem) from None

  _banner("1/4 dataset")
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  d = ae_config.data
  builder = builders.make_builder(d.dataset, d.data_dir, d.config_name, **d.build.to_dict())
  reused = builders.prepare(builder)
  print(("reused " if reused else "built ") + builder.data_dir)

  _banner("2/4 autoencoder")
  train_and_export(ae_config, workdir, "autoencoder")
  _banner("3/4 denoiser")
  dn_export = train_and_export(dn_config, workdir, "denoiser")
  baselines = {b: train_and_export(c, workdir, f"denoiser_{b}")
               for b, c in baseline_configs.items()}

  _banner("4/4 evaluation")
  eval_dir = os.path.join(workdir, "eval")
  if maze:
    return _memory_maze_protocol(eval_dir, dn_export, baselines)
  backends = ",".join(_BACKENDS.value)
  first = _HELDOUT_SEED.value
  revisit_args = ["--benchmark=revisit", f"--checkpoint={dn_export}", f"--backends={backends}",
                  f"--procedural_seeds={first}:{first + _NUM_TRAJECTORIES.value}",
                  f"--num_frames={_NUM_FRAMES.value}"]
  if baselines:
    revisit_args.append("--baseline_checkpoints=" + ",".join(f"{b}={p}" for b, p in baselines.items()))
  revisit_args += _LPIPS.args()
  _evaluate(revisit_args, os.path.join(eval_dir, "revisit"), rows=baseline_rows(baselines),
            lpips_scored=True)
  if _MORE_STEPS.value > 0:
    more = os.path.join(eval_dir, f"revisit_steps{_MORE_STEPS.value}")
    _evaluate([*revisit_args, f"--sampler_steps={_MORE_STEPS.value}", "--novideos"], more,
              rows=baseline_rows(baselines), lpips_scored=True)
    print(f"\nrevisit with {_MORE_STEPS.value} sampler steps (config: "
          f"{dn_config.sampler.num_steps}):")
    print_revisit_table(more)
  _evaluate(["--benchmark=scaling", f"--checkpoint={dn_export}", f"--backends={backends}",
             f"--lengths={','.join(_LENGTHS.value)}"], os.path.join(eval_dir, "scaling"))
  if _OBJECT_TRAJECTORIES.value > 0:
    first = _OBJECT_SEED.value
    _evaluate(["--benchmark=objects", f"--checkpoint={dn_export}",
               f"--procedural_seeds={first}:{first + _OBJECT_TRAJECTORIES.value}",
               f"--num_frames={_OBJECT_FRAMES.value}", *_LPIPS.args()],
              os.path.join(eval_dir, "objects"), lpips_scored=True)
  claims = print_claims(eval_dir)
  from mirage_jax.evaluation import index_html  # pylint: disable=g-import-not-at-top
  reports = {name: os.path.join(eval_dir, name, "index.html")
             for name in ("revisit", "scaling", "objects")}
  page = index_html.write_summary_index(
      eval_dir, claims, {k: p for k, p in reports.items() if os.path.exists(p)},
      command=["python", "-m", "mirage_jax.main_job", *sys.argv[1:]])
  print(f"\nreport: {os.path.abspath(page)}")
  return 0


def _memory_maze_protocol(eval_dir: str, dn_export: str, baselines: dict) -> int:
  """Stage 4 of a model trained on Memory Maze: ``evaluate --benchmark=memory_maze`` (the
  protocol of Po et al. 2025, scaled down) on held-out mazes, and its table beside the
  paper's figures."""
  from mirage_jax.evaluation import memory_maze_protocol  # pylint: disable=g-import-not-at-top
  out = os.path.join(eval_dir, "memory_maze")
  seeds = _MAZE_SEEDS.value.split(":")
  count = int(seeds[1]) - int(seeds[0]) if len(seeds) == 2 and all(x.isdigit() for x in seeds) else 0
  args = ["--benchmark=memory_maze", f"--checkpoint={dn_export}",
          f"--backends={','.join(_BACKENDS.value)}", f"--memory_maze_context={_MAZE_CONTEXT.value}",
          f"--memory_maze_seeds={_MAZE_SEEDS.value}", f"--trajectory_batch={max(count, 0)}"]
  if baselines:
    args.append("--baseline_checkpoints=" + ",".join(f"{b}={p}" for b, p in baselines.items()))
  _evaluate(args + _LPIPS.args(), out, rows=baseline_rows(baselines),
            group=memory_maze_protocol.GROUP, lpips_scored=True)
  with open(os.path.join(out, "metrics.json")) as f:
    print("\n" + memory_maze_protocol.format_table(json.load(f)))
  print(f"\nvideos: {os.path.join(out, 'videos')}/<trajectory>/<row>.mp4")
  print(f"\nreport: {os.path.abspath(os.path.join(out, 'index.html'))}")
  return 0


def baseline_rows(baselines) -> list[str]:
  """The revisit rows of the trained baselines (``revisit.TRAINED`` suffix)."""
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  return [b + revisit.TRAINED for b in baselines]


def _evaluate(args: list[str], output_dir: str, rows: list[str] = (), group: str = "revisit",
              lpips_scored: bool = False) -> None:
  """Runs ``mirage_jax.evaluate`` into ``output_dir`` unless it already finished there
  (with ``rows`` among the rows of its ``group``: a run without the baselines is redone;
  for an evaluation that scores LPIPS (``lpips_scored``), so is one without LPIPS once
  ``--lpips_backbone`` is given)."""
  metrics = os.path.join(output_dir, "metrics.json")
  if os.path.exists(metrics):
    with open(metrics) as f:
      done = json.load(f)
    have = done.get(group, {}).get("summary", {})
    lpips_missing = lpips_scored and _LPIPS.backbone.value and not done.get("lpips")
    if all(r in have for r in rows) and not lpips_missing:
      print(f"reusing {output_dir}")
      return
  _run_command("mirage_jax.evaluate", f"--output_dir={output_dir}", "--overwrite", *args)


def _run_command(module: str, *args: str) -> None:
  """``python -m module args...`` (another command line of the project), echoed; a failure
  ends the job."""
  cmd = [sys.executable, "-m", module, *args]
  print(" ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True)


def _main_wan(workdir: str) -> int:
  """``--family=wan`` (see the module docstring): procedural rooms -> Wan VAE pretrained ->
  latent clips -> Wan DiT pretrained -> Mirage VACE + LoRA fine-tune -> revisit benchmark."""
  # pylint: disable=g-import-not-at-top
  import jax
  from data_pipelines import builders, latent_clips
  from mirage_jax import checkpoint
  from mirage_jax.families.wan import vae as wan_vae
  from mirage_jax.training import inputs
  # pylint: enable=g-import-not-at-top
  experiment = load_config_file(os.path.join(_EXPERIMENTS, "wan_tiny_cpu.py"), "--family")
  vae_config, base_config, config = (experiment.get_config(s) for s in experiment.STAGES)
  data_dir, latents = os.path.join(workdir, "data"), os.path.join(workdir, "latents")
  for c, steps in ((vae_config, _AE_STEPS.value), (base_config, _WAN_BASE_STEPS.value),
                   (config, _DN_STEPS.value)):
    if steps:
      c.train.steps = steps
      # A shortened run still logs a curve (at least 5 points).
      c.train.log_every = min(c.train.log_every, max(1, steps // 5))
    if _WAN_CLIPS.value:
      c.data.build.num_clips = _WAN_CLIPS.value
    if jax.device_count() < c.mesh.fsdp:  # a plain CPU process has one device
      c.mesh = dict(data=1, fsdp=1, context=1, tensor=-1)
  vae_config.data.data_dir = os.path.abspath(data_dir)
  if _WAN_SAMPLER_STEPS.value:
    config.sampler.num_steps = _WAN_SAMPLER_STEPS.value
  d = config.denoiser
  stats_batches = max(1, experiment.LATENT_STATS_CLIPS // vae_config.data.batch_size)

  _banner("1/6 procedural dataset")
  v = vae_config.data
  builder = builders.make_builder(v.dataset, data_dir, v.config_name, **v.build.to_dict())
  print(("reused " if builders.prepare(builder) else "built ") + builder.data_dir)

  _banner("2/6 Wan VAE, from scratch")
  vae_export = train_and_export(vae_config, workdir, "vae", update_config=lambda c, p: (
      wan_vae.calibrated_config(c, p, inputs.training_videos(c, stats_batches), "main_job")))
  print_loss_curve(os.path.join(workdir, "vae", "metrics.jsonl"), "psnr")

  _banner("3/6 the dataset -> latent clips (the VAE just trained)")
  if os.path.exists(os.path.join(latents, latent_clips.METADATA)):
    print(f"reusing {latents}")
  else:
    h, w = config.data.resolution
    _run_command("data_pipelines.encode_latents", f"--data_dir={data_dir}",
                 f"--dataset={v.dataset}", f"--config_name={v.config_name}",
                 f"--vae={vae_export}", f"--output_dir={latents}", f"--resolution={h},{w}",
                 f"--target_frames={d.target_frames}", f"--preceding_frames={d.preceding_frames}",
                 f"--windows_per_clip={experiment.WINDOWS_PER_CLIP}",
                 f"--text_len={d.text_len}", f"--text_dim={d.model.text_dim}")
  # The DiT runs record the VAE their latents come from (its latent statistics included): the
  # world model decodes with it and checks it is that one.
  vae_settings = checkpoint.export_config(vae_export).autoencoder
  for c in (base_config, config):
    c.data.data_dir = os.path.abspath(latents)
    c.autoencoder = vae_settings
    c.denoiser.autoencoder_checkpoint = os.path.abspath(vae_export)

  _banner("4/6 Wan DiT, from scratch (no memory)")
  base_export = train_and_export(base_config, workdir, "dit")
  print_loss_curve(os.path.join(workdir, "dit", "metrics.jsonl"))

  _banner("5/6 Mirage: VACE + LoRA fine-tuned on the frozen pretrained DiT")
  d.base_checkpoint = os.path.abspath(base_export)
  dn_export = train_and_export(config, workdir, "denoiser")
  losses = print_loss_curve(os.path.join(workdir, "denoiser", "metrics.jsonl"))

  _banner("6/6 revisit benchmark")
  revisit_dir = os.path.join(workdir, "eval", "revisit")
  first = _HELDOUT_SEED.value
  # The pretrained DiT alone is the baseline trained without memory: row 'none (trained)'.
  baselines = {"none": base_export}
  _evaluate(["--benchmark=revisit", f"--checkpoint={dn_export}",
             f"--backends={','.join(_BACKENDS.value)}",
             f"--procedural_seeds={first}:{first + _NUM_TRAJECTORIES.value}",
             f"--num_frames={_NUM_FRAMES.value}",
             "--baseline_checkpoints=" + ",".join(f"{b}={p}" for b, p in baselines.items()),
             *_LPIPS.args()], revisit_dir, rows=baseline_rows(baselines), lpips_scored=True)
  print_revisit_table(revisit_dir)
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  with open(os.path.join(revisit_dir, "metrics.json")) as f:
    metrics = json.load(f)["revisit"]
  for b in ("mirage", "voxel"):
    diff = revisit.paired_difference(metrics, b, "none" + revisit.TRAINED)
    if diff is not None:
      print(f"  {b} - none (trained) revisit PSNR: {diff['mean']:+.2f} dB (per loop: "
            f"{diff['min']:+.2f} .. {diff['max']:+.2f}, {diff['better']} of {diff['count']} better)")
  claims = revisit.claims(metrics["summary"])
  if len(losses) >= 2:
    claims["training loss falls"] = losses[-1] < losses[0]
  for claim, ok in claims.items():
    print(f"  [{'PASS' if ok else 'FAIL'}] {claim}")
  print(f"\nvideos: {os.path.join(revisit_dir, 'videos')}/<trajectory>/<row>.mp4")
  print(f"report: {os.path.abspath(os.path.join(revisit_dir, 'index.html'))}")
  return 0


def print_loss_curve(metrics_jsonl: str, metric: str = "loss") -> list[float]:
  """Prints the logged (step, ``metric``) of a training run; returns the logged values."""
  with open(metrics_jsonl) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if metric in r]
  label = "loss curve" if metric == "loss" else f"{metric} curve"
  print(f"{label}: " + ", ".join(f"{r.get('step', '?')}:{r[metric]:.4g}" for r in records))
  return [r[metric] for r in records]


def revisit_rows(summary: dict, cost: dict | None = None, lengths=()) -> list[dict]:
  """Table rows of a revisit summary, with the scaling cost columns where ``cost`` has them."""
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  cost = cost or {}
  rows = []
  for row, s in summary.items():
    if not isinstance(s, dict) or "psnr_revisit" not in s:
      continue
    line = dict(row=revisit.row_label(row), psnr_revisit=s.get("psnr_revisit"), ssim_revisit=s.get("ssim_revisit"),
                lpips_revisit=s.get("lpips_revisit"), psnr_all=s.get("psnr_all"), psnr_unseen=s.get("psnr_unseen"),
                ssim_unseen=s.get("ssim_unseen"), revisit_loss=s.get("revisit_loss"))
    for n in lengths:
      if (row, n) in cost:
        line[f"cache_MB@{n}"] = cost[row, n]["cache_bytes"] / 1e6
        line[f"s/chunk@{n}"] = cost[row, n]["chunk_seconds"]
    rows.append(line)
  return rows


def print_revisit_table(revisit_dir: str) -> list[dict]:
  """Prints the revisit benchmark's table (``<revisit_dir>/metrics.json``); returns its rows."""
  from mirage_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  with open(os.path.join(revisit_dir, "metrics.json")) as f:
    metrics = json.load(f)
  columns = ["row", "psnr_revisit", "ssim_revisit", "lpips_revisit", "psnr_all", "psnr_unseen",
             "ssim_unseen"]
  rows = lpips.table_rows(revisit_rows(metrics["revisit"]["summary"]), columns,
                          metrics.get("lpips"))
  print("\n" + report.format_table(rows, columns, ".3f"))
  return rows


def print_claims(eval_dir: str) -> dict[str, bool]:
  """Prints the revisit and cost table of the main job and checks the project's claims.

  The first-visit columns (``psnr_unseen``, ``ssim_unseen``) score frames with no memory
  coverage (``revisit.first_visit_frames``), the same frames for every row.

  Claims (held-out procedural loop trajectories): voxel's revisit PSNR beats no memory (the
  baseline trained without it when ``--train_baselines`` has ``none``) by >= 4 dB;
  voxel is at most 1 dB below mirage with a >= 10x smaller cache at the longest length; voxel's
  time per chunk at the longest length is within 20% of the shortest.
  """
  from mirage_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  with open(os.path.join(eval_dir, "revisit", "metrics.json")) as f:
    metrics = json.load(f)
  summary = metrics["revisit"]["summary"]
  entries = report.read_scaling_json(os.path.join(eval_dir, "scaling", "scaling.json"))
  lengths = sorted({e["frames"] for e in entries})
  cost = {(e["backend"], e["frames"]): e for e in entries}
  columns = ["row", "psnr_revisit", "ssim_revisit", "lpips_revisit", "psnr_all", "psnr_unseen",
             "ssim_unseen", "revisit_loss"]
  columns += [f"cache_MB@{n}" for n in lengths] + [f"s/chunk@{n}" for n in lengths]
  rows = lpips.table_rows(revisit_rows(summary, cost, lengths), columns, metrics.get("lpips"))
  print("\n" + report.format_table(rows, columns, ".3f"))

  from mirage_jax.evaluation import revisit, scaling  # pylint: disable=g-import-not-at-top
  claims = {**revisit.claims(summary), **scaling.claims(entries)}
  gap = revisit.oracle_gap(summary)
  if gap is not None:
    print(f"\noracle - voxel revisit PSNR: {gap['revisit']:.2f} dB; on revisits of the given "
          f"frame {gap['given']:.2f} dB, of generated ones {gap['generated']:.2f} dB, of which "
          f"voxel's memory loses {gap['memory']:.2f} dB (the rest is first-visit generation)")
  claims.update(_object_claims(os.path.join(eval_dir, "objects", "metrics.json")))
  for claim, ok in claims.items():
    print(f"  [{'PASS' if ok else 'FAIL'}] {claim}")
  print(f"\nvideos: {os.path.join(eval_dir, '{revisit,objects}', 'videos')}/<trajectory>/<row>.mp4")
  print(f"plots:  {os.path.join(eval_dir, 'revisit', 'quality_vs_frame.png')}, "
        f"{os.path.join(eval_dir, 'scaling', 'cost_vs_length.png')}")
  return claims


def _object_claims(path: str) -> dict[str, bool]:
  """Prints the moving-objects table (if that benchmark ran) and returns its claims."""
  if not os.path.exists(path):
    return {}
  from mirage_jax.evaluation import objects_benchmark, report  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    metrics = json.load(f)
  summary = metrics["summary"]
  rows = lpips.table_rows([dict(row=r, **{c: s.get(c) for c in objects_benchmark.SCALARS})
                           for r, s in summary.items() if isinstance(s, dict)],
                          objects_benchmark.SCALARS, metrics.get("lpips"))
  print("\nmoving objects: " + ", ".join(f"{summary[c]} {c.replace('_', ' ')}"
                                         for c in objects_benchmark.COUNTS))
  print(report.format_table(rows, ["row", *objects_benchmark.SCALARS], ".3f"))
  return objects_benchmark.claims(summary)


class _OurInfoOnly(std_logging.Filter):
  """Passes warnings and errors, and INFO records from this project's own modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    ours = os.sep + "mirage_jax" + os.sep in record.pathname
    return record.levelno >= std_logging.WARNING or ours


if __name__ == "__main__":
  run_app(_main)
