"""Every shell command in README.md, launch/README.md and docs/*.md, read from the docs and run.

The commands are extracted from the docs themselves (``extract_commands``): fenced ``bash`` /
``sh`` / ``console`` / unlabelled blocks and indented code blocks (lines that start with a
command word, ``\\`` continuations joined as the shell joins them), and the backticked
``python ...`` commands in table rows. ``COMMANDS`` says how each one is run, keyed by its
documented text; a command in the docs that is not in ``COMMANDS`` (or the reverse) fails
``test_docs_and_table_agree``, so a doc edit is also an edit here.

How a command runs (``Doc.how``):
  * ``run``: as written, in a fresh-clone-like folder (``clone``: ``experiments/``,
    ``launch/``, ``setup.py`` of this checkout, nothing built), after the entry's
    placeholder substitutions (``subs``, literal text replacements of the documented
    command: ``DIR``, ``EXPORT``, ``gs://BUCKET`` -> the GCS emulator's bucket, a choice
    among ``a|b``; optional ``[...]`` parts an entry does not name are left out) and its
    size flags (``flags``: ``--name=value`` replacing the documented value or appended),
    each with its reason (``why``). Chains run in the order the docs give them
    (``CHAINS``), each command's exit status and the files it writes checked.
  * ``dry``: needs a pod, a cluster, released weights or hours. Its ``python -m`` entry point
    is run with the flags as written (after ``subs``) up to the start of the work
    (``tests/doc_dry_run.py``: the module's own flag parser, config file and overrides,
    the start-up checks: a denoiser's autoencoder export, the Beam runner and its extra, the
    TPU topology and the config's mesh on it).
  * ``script``: a launcher (``launch/*.sh``, ``sbatch launch/slurm.sbatch``) run as written
    with the cluster's own tools (``gcloud``, ``xpk``, ``sbatch``, ``srun``) replaced by
    stubs that record what they were asked to run; the ``python -m mirage_jax.main ...``
    it would run on every host is then dry-run as above.
  * ``make``: ``make -n TARGET`` (what the target runs), its python command dry-run.
  * ``pip``: the extras and pins named exist in setup.py (no network here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import test_gcs
from tests.test_gcs import gcs  # pylint: disable=unused-import  # the emulator fixture
from tests.conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "launch/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
DEADLINE_S = 420  # one command on the loaded 2-core machine

# ----------------------------------------------------------------------------- extraction

_COMMAND_WORDS = ("python", "python3", "pip", "make", "sbatch", "bash", "gcloud", "xpk")
_SHELL_LANGS = ("bash", "sh", "console", "shell", "")


def _is_command(line: str) -> bool:
  """A shell command: (VAR=value ...) then a command word or a launcher script."""
  words = line.split()
  while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
    words = words[1:]
  return bool(words) and (words[0] in _COMMAND_WORDS or
                          re.fullmatch(r"launch/\S+\.(sh|sbatch)", words[0]) is not None)


def _logical_lines(lines: list[str]) -> list[str]:
  """Joins backslash-newline continuations as the shell does (the two characters removed,
  the next line's text, leading spaces included, appended); drops ``$ `` prompts."""
  out, current = [], None
  for raw in lines:
    line = raw[2:] if raw.lstrip().startswith("$ ") else raw
    current = line if current is None else current + line
    if current.endswith("\\"):
      current = current[:-1]
      continue
    out.append(current)
    current = None
  if current is not None:
    out.append(current)
  return out


def normalise(command: str) -> str:
  """One space between words, a trailing ``# comment`` removed."""
  return " ".join(re.sub(r"(^|\s)#.*$", "", command).split())


def extract_commands(doc: str) -> list[str]:
  """The shell commands of one markdown file, in order (see the module docstring)."""
  lines = (ROOT / doc).read_text().splitlines()
  found: list[str] = []
  i, after_blank = 0, True
  while i < len(lines):
    line = lines[i]
    fence = re.match(r"^\s*```(\S*)\s*$", line)
    if fence:
      end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
      if fence.group(1) in _SHELL_LANGS:
        found += [c for c in map(normalise, _logical_lines(lines[i + 1:end])) if _is_command(c)]
      i, after_blank = end + 1, False
      continue
    if after_blank and line.startswith("    ") and line.strip():  # an indented code block
      end = i
      while end < len(lines) and lines[end].startswith("    "):
        end += 1
      found += [c for c in map(normalise, _logical_lines(lines[i:end])) if _is_command(c)]
      i, after_blank = end, False
      continue
    if line.startswith("|"):  # a table row: its backticked python commands
      found += [normalise(span.replace("\\|", "|")) for span in re.findall(r"`([^`]*)`", line)
                if span.startswith("python")]
    after_blank = not line.strip()
    i += 1
  return found


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Doc:
  """How one documented command is run (module docstring)."""
  text: str  # the documented command, normalised (a regex when ``loose``)
  files: tuple[str, ...]  # where it is documented
  how: str  # run | dry | script | make | pip
  why: str  # why it is run this way: every substitution and size flag explained
  subs: tuple[tuple[str, str], ...] = ()  # literal replacements of the documented text
  flags: tuple[str, ...] = ()  # --name=value: replaces the documented value or is appended
  loose: bool = False  # ``text`` is a regex (sections expected to change soon)
  example: str = ""  # loose entries: the command run (must match ``text``)


R, L = ("README.md",), ("launch/README.md",)
BUILD = ("python -m data_pipelines.build --dataset=procedural_rooms --data_dir=data --num_clips=96 "
         "--frames_per_clip=24 --resolution=32 --moving_objects=2")
TABLE_TRAIN = ("python -m mirage_jax.main --config=experiments/tiny_cpu.py[:denoiser] --workdir=DIR "
               "[--config.train.steps=100 ...]")
TABLE_EXPORT = "python -m mirage_jax.export --workdir=DIR --output=EXPORT [--dtype=bfloat16]"
STEPS = "--config.train.steps=2"
STEPS_WHY = ("2 training steps instead of the config's 2000/2400 (minutes each here): the "
             "command's path, not the model's quality, is what is checked")
GEN_FRAMES = "--num_frames=4"
GEN_WHY = "4 generated frames instead of the clip's 24: one chunk and a memory write"
GS = (("BUCKET", "mirage-test"),)
GS_WHY = "gs://BUCKET -> the GCS emulator's bucket (tests/test_gcs.py's fixture)"
MAIN_JOB_WHY = ("trains both stages for their full steps (25 min to an hour here); "
                "tests/test_main_job.py runs a reduced main_job end to end")
POD_WHY = "needs a TPU pod (or a GPU cluster) and its bucket"

COMMANDS: dict[str, Doc] = {
    # ---- README: the two make targets
    "make_main": Doc("make main", R, "make", MAIN_JOB_WHY),
    "make_test": Doc("make test", R, "make", "is this suite"),
    # ---- README: the command table, as one chain build -> train -> export -> geometry ->
    # generate -> evaluate (the gs:// chain below shares the build)
    "build": Doc(BUILD, R, "run", "as written (about a minute here): the tiny config's dataset"),
    "table_train_ae": Doc(TABLE_TRAIN, R, "run", f"[:denoiser] left out: stage 1; DIR -> runs/ae; "
                          f"{STEPS_WHY}", subs=(("DIR", "runs/ae"),), flags=(STEPS,)),
    "table_export_ae": Doc(TABLE_EXPORT, R, "run", "DIR/EXPORT -> the stage-1 run and export",
                           subs=(("DIR", "runs/ae"), ("EXPORT", "exports/ae"))),
    "table_train_dn": Doc(
        TABLE_TRAIN, R, "run", "[:denoiser] taken: stage 2, with the `...` override every denoiser "
        f"needs (its autoencoder export, as the gs:// chain shows); {STEPS_WHY}",
        subs=(("[:denoiser]", ":denoiser"), ("DIR", "runs/dit")),
        flags=(STEPS, "--config.denoiser.autoencoder_checkpoint=exports/ae")),
    "table_export_dn": Doc(TABLE_EXPORT, R, "run", "DIR/EXPORT -> the denoiser run and export",
                           subs=(("DIR", "runs/dit"), ("EXPORT", "exports/dit"))),
    "table_geometry": Doc(
        "python -m data_pipelines.make_geometry --data_dir=DIR --clip=I --output=geometry.npz "
        "[--split=test --frame_range=a:b]", R, "run",
        "DIR -> the built dataset, I -> 0, the optional part taken with frames 0:12",
        subs=(("DIR", "data"), ("I", "0"), ("[--split=test --frame_range=a:b]",
                                             "--split=test --frame_range=0:12"))),
    "table_generate": Doc(
        "python -m mirage_jax.generate --checkpoint=EXPORT --geometry_path=geometry.npz "
        "--output_dir=OUT [--memory=voxel] [--depth_model=DEPTH_EXPORT]", R, "run",
        f"EXPORT -> the denoiser export, OUT -> out/generate, [--memory=voxel] taken, "
        f"[--depth_model] left out (tests/test_depth_generation.py generates with one); {GEN_WHY}",
        subs=(("EXPORT", "exports/dit"), ("OUT", "out/generate"), ("[--memory=voxel]", "--memory=voxel")),
        flags=(GEN_FRAMES,)),
    "table_evaluate": Doc(
        "python -m mirage_jax.evaluate --checkpoint=EXPORT --benchmark=revisit|scaling|objects "
        "--output_dir=OUT [--data_dir=DIR | --procedural_seeds=a:b] [--backends=none,mirage,voxel] "
        "[--object_rows=mirage,voxel,voxel+objects]", R, "run",
        "EXPORT -> the denoiser export, revisit of the three, OUT -> out/eval, the procedural "
        "seeds 0:1 and the backends taken; 1 trajectory of 8 frames without the oracle and "
        "composite rows (the full benchmark is 8 x 48 frames, minutes)",
        subs=(("EXPORT", "exports/dit"), ("revisit|scaling|objects", "revisit"), ("OUT", "out/eval"),
              ("[--data_dir=DIR | --procedural_seeds=a:b]", "--procedural_seeds=0:1"),
              ("[--backends=none,mirage,voxel]", "--backends=none,mirage,voxel")),
        flags=("--num_trajectories=1", "--num_frames=8", "--oracle=false", "--composite=false")),
    "table_memory_maze": Doc(
        "python -m mirage_jax.main_job --workdir=DIR --config=experiments/tiny_cpu.py:memory_maze "
        "--backends=none,frame_bank,mirage,voxel", R, "dry",
        "renders 64 Memory Maze clips and trains 1400 steps (about an hour here); "
        "tests/test_memory_maze_protocol.py runs the protocol reduced",
        subs=(("DIR", "runs/memory_maze"),)),
    "wan_scaling": Doc(
        "python -m mirage_jax.evaluate --checkpoint=WAN_EXPORT --benchmark=scaling --output_dir=OUT "
        "--backends=rgb_points,mirage,voxel --lengths=65,257,513 --timed_chunks=1", R, "dry",
        "needs a Wan export and compiles one Wan chunk step per backend and length (tens of "
        "minutes on this CPU); tests/test_wan_generate.py runs the Wan scaling benchmark with "
        "rgb_points at one length on a tiny export"),
    "table_aot": Doc("python -m mirage_jax.aot --config=experiments/pod_v5p_128.py --topology=v5p:4x4x4",
                     R, "dry", "compiling the pod config takes many minutes; tests/test_aot.py "
                     "compiles a small config for a TPU topology"),
    "table_convert_wan": Doc(
        r"python -m mirage_jax\.convert_wan --wan_dir=\S+ .*--output=EXPORT.*", R, "dry",
        "needs the released Wan2.2 weights (tens of GB); tests/test_convert_wan.py converts "
        "random files in the released layout", loose=True,
        example="python -m mirage_jax.convert_wan --wan_dir=Wan2.2-TI2V-5B --vace=vace.safetensors "
                "--lora=lora.safetensors --output=EXPORT --dtype=bfloat16 --merge_lora "
                "--text_encoder=UMT5_EXPORT --tokenizer=Wan2.2-TI2V-5B/google/umt5-xxl"),
    "table_convert_text": Doc(
        r"python -m mirage_jax\.convert_text --weights=\S+ --output=\S+", R, "dry",
        "needs the released umT5-xxl encoder (11 GiB); tests/test_umt5.py converts random files "
        "in both released layouts, tests/test_prompts.py encodes prompts with one", loose=True,
        example="python -m mirage_jax.convert_text "
                "--weights=Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth --output=UMT5_EXPORT"),
    "table_convert_depth": Doc(
        r"python -m mirage_jax\.convert_depth --weights=\S+ --variant=\S+ --kind=\S+ --output=\S+", R,
        "dry", "needs the released Depth Anything V2 weights; tests/test_depth_anything.py "
        "converts random files in both released layouts", loose=True,
        example="python -m mirage_jax.convert_depth --weights=depth_anything_v2_vits.pth "
                "--variant=small --kind=relative --output=DEPTH_EXPORT"),
    "table_train_depth": Doc(
        "python -m mirage_jax.main --config=experiments/depth_tiny_cpu.py --workdir=DIR", R, "run",
        f"DIR -> runs/depth, on the dataset the build row made; {STEPS_WHY}",
        subs=(("DIR", "runs/depth"),), flags=(STEPS,)),
    "table_to_reference": Doc(
        r"python -m mirage_jax\.convert_wan --to_reference --checkpoint=\S+ --output=\S+", R, "dry",
        "needs a Wan export; tests/test_convert_wan.py", loose=True,
        example="python -m mirage_jax.convert_wan --to_reference --checkpoint=EXPORT/dit --output=DIR"),
    "table_encode_latents": Doc(
        r"python -m data_pipelines\.encode_latents --data_dir=\S+ --vae=\S+ --output_dir=\S+.*", R, "dry",
        "needs a Wan VAE export; tests/test_wan_pipeline.py", loose=True,
        example="python -m data_pipelines.encode_latents --data_dir=DIR --vae=EXPORT/vae "
                "--output_dir=LATENTS"),
    "table_encode_captions": Doc(
        r"python -m data_pipelines\.encode_latents --data_dir=\S+ --vae=\S+ --output_dir=\S+ "
        r"--text_encoder=\S+ --tokenizer=\S+", R, "dry",
        "needs a Wan VAE export and the umT5-xxl encoder (11 GiB); tests/test_wan_train.py "
        "encodes a captioned procedural dataset with a tiny random umT5 and a tokenizer it "
        "trains", loose=True,
        example="python -m data_pipelines.encode_latents --data_dir=DIR --vae=EXPORT/vae "
                "--output_dir=LATENTS --text_encoder=UMT5_EXPORT "
                "--tokenizer=Wan2.2-TI2V-5B/google/umt5-xxl"),
    "table_wan_finetune": Doc(
        r"python -m mirage_jax\.main --config=experiments/mirage_wan22_5b\.py:\S+ .*--workdir=\S+", R,
        "dry", f"the 5B fine-tune {POD_WHY}; the tiny Wan run is main_job --family=wan "
        "(tests/test_wan_pipeline.py)", loose=True,
        example="python -m mirage_jax.main --config=experiments/mirage_wan22_5b.py:ti2v_5b,v5p_128 "
                "--config.denoiser.base_checkpoint=EXPORT/dit --config.data.data_dir=LATENTS "
                "--workdir=DIR"),
    "table_wan_vae_pretrain": Doc(
        r"python -m mirage_jax\.main --config=experiments/wan22_pretrain\.py:autoencoder,\S+ .*--workdir=\S+.*", R,
        "dry", f"the 705M-param VAE {POD_WHY}; tests/test_wan_vae_train.py trains the tiny one "
        "(and main_job --family=wan, tests/test_wan_pipeline.py)", loose=True,
        example="python -m mirage_jax.main --config=experiments/wan22_pretrain.py:autoencoder,ti2v_5b,v5p_128 "
                "--config.data.data_dir=DIR --workdir=DIR"),
    "table_wan_dit_pretrain": Doc(
        r"python -m mirage_jax\.main --config=experiments/wan22_pretrain\.py:denoiser,\S+ .*--workdir=\S+", R,
        "dry", f"the 5B DiT {POD_WHY}; tests/test_wan_pretrain.py trains the tiny one (and "
        "main_job --family=wan, tests/test_wan_pipeline.py)", loose=True,
        example="python -m mirage_jax.main --config=experiments/wan22_pretrain.py:denoiser,ti2v_5b,v5p_128 "
                "--config.data.data_dir=LATENTS --workdir=DIR"),
    # ---- README: from `make main` to your own generate (make main's names -> this clone's)
    "own_geometry_dataset": Doc(
        "python -m data_pipelines.make_geometry --data_dir=runs/tiny/data --split=test --clip=0 "
        "--output=runs/tiny/clip0/geometry.npz", R, "run",
        "runs/tiny/data (make main's dataset) -> data, the same build",
        subs=(("runs/tiny/data", "data"),)),
    "own_generate": Doc(
        "python -m mirage_jax.generate --checkpoint=runs/tiny/denoiser_export "
        "--geometry_path=runs/tiny/clip0/geometry.npz --output_dir=runs/tiny/generate/clip0", R, "run",
        f"runs/tiny/denoiser_export (make main's) -> the chain's denoiser export; {GEN_WHY}",
        subs=(("runs/tiny/denoiser_export", "exports/dit"),), flags=(GEN_FRAMES,)),
    "own_geometry_files": Doc(
        "python -m data_pipelines.make_geometry --frames=first_frame.png --depth=depth.npy "
        "--cameras=cameras.txt --output=mine/geometry.npz", R, "run",
        "as written; the user's three files are written by the test from a rendered clip"),
    # ---- README: the gs:// chain, on the emulator
    "gs_train_ae": Doc(
        "python -m mirage_jax.main --config=experiments/tiny_cpu.py:autoencoder "
        "--workdir=gs://BUCKET/runs/tiny_ae", R, "run", f"{GS_WHY}; {STEPS_WHY}", subs=GS, flags=(STEPS,)),
    "gs_export_ae": Doc(
        "python -m mirage_jax.export --workdir=gs://BUCKET/runs/tiny_ae --output=gs://BUCKET/exports/tiny_ae",
        R, "run", GS_WHY, subs=GS),
    "gs_train_dn": Doc(
        "python -m mirage_jax.main --config=experiments/tiny_cpu.py:denoiser --workdir=gs://BUCKET/runs/tiny_dit "
        "--config.denoiser.autoencoder_checkpoint=gs://BUCKET/exports/tiny_ae", R, "run",
        f"{GS_WHY}; {STEPS_WHY}", subs=GS, flags=(STEPS,)),
    "gs_export_dn": Doc(
        "python -m mirage_jax.export --workdir=gs://BUCKET/runs/tiny_dit --output=gs://BUCKET/exports/tiny_dit",
        R, "run", GS_WHY, subs=GS),
    "gs_geometry": Doc("python -m data_pipelines.make_geometry --data_dir=data --clip=0 --output=clip/geometry.npz",
                       R, "run", "as written"),
    "gs_generate": Doc(
        "python -m mirage_jax.generate --checkpoint=gs://BUCKET/exports/tiny_dit "
        "--geometry_path=clip/geometry.npz --output_dir=gs://BUCKET/videos/clip", R, "run",
        f"{GS_WHY}; {GEN_WHY}", subs=GS, flags=(GEN_FRAMES,)),
    # ---- README: the reference's sample folders
    "reference_samples": Doc(
        "python -m data_pipelines.build --dataset=reference_samples --data_dir=DIR "
        "--source_dir=data/train --num_clips=0 --beam_runner=DirectRunner "
        "--beam_options=direct_num_workers=8,direct_running_mode=multi_processing", R, "dry",
        "needs the reference's sample folders (data/train); checked up to the work "
        "(tests/test_sample_folders.py builds such folders on 2 workers)"),
    # ---- README: Beam
    "beam_local": Doc(
        "python -m data_pipelines.build --dataset=procedural_rooms --data_dir=DIR --num_clips=N "
        "--beam_runner=DirectRunner --beam_options=direct_num_workers=8,direct_running_mode=multi_processing",
        R, "run", "DIR -> beam_data, N -> 6 clips, 2 worker processes instead of 8 (2 cores here)",
        subs=(("DIR", "beam_data"), ("N", "6"), ("direct_num_workers=8", "direct_num_workers=2"))),
    "beam_dataflow": Doc(
        "python -m data_pipelines.build --dataset=procedural_rooms --data_dir=gs://BUCKET/data "
        "--num_clips=200000 --frames_per_clip=96 --resolution=256 --beam_runner=DataflowRunner "
        "--beam_options=project=PROJECT,region=us-central1,temp_location=gs://BUCKET/tmp,"
        "staging_location=gs://BUCKET/staging,setup_file=./setup.py,max_num_workers=500,"
        "machine_type=n2-standard-8,experiments=use_runner_v2", R, "dry",
        "needs a Google Cloud project; checked up to the runner (without the documented "
        "apache-beam[gcp] install it must stop with exactly that install step)"),
    # ---- README: clips from raw videos
    "cut_clips": Doc(
        "python -m data_pipelines.cut_clips --videos=VIDEOS --output_dir=CLIPS --fps=16 "
        "--size=704x1280 --frames=81 --seed=0", R, "dry",
        "needs raw videos at least 704x1280 and 5 s long; tests/test_cut_clips.py runs this "
        "command on tiny synthetic videos with both folders on the GCS emulator"),
    # ---- README: trained baselines, Memory Maze
    "baselines_main_job": Doc("python -m mirage_jax.main_job --workdir=runs/tiny --train_baselines=none,frame_bank",
                              R, "dry", MAIN_JOB_WHY + " (with --train_baselines)"),
    "baselines_evaluate": Doc(
        "python -m mirage_jax.evaluate --benchmark=revisit --checkpoint=MEMORY_EXPORT "
        "--baseline_checkpoints=none=NONE_EXPORT,frame_bank=FRAME_BANK_EXPORT ...", R, "dry",
        "needs three trained exports (main_job --train_baselines); `...` -> --output_dir=OUT",
        subs=(("...", "--output_dir=OUT"),)),
    "memory_maze_job": Doc(
        "python -m mirage_jax.main_job --workdir=runs/memory_maze --config=experiments/tiny_cpu.py:memory_maze "
        "--backends=none,frame_bank,mirage,voxel [--memory_maze_context=100 "
        "--memory_maze_seeds=1000000:1000004 --train_baselines=none,frame_bank]", R, "dry",
        "about an hour here (see table_memory_maze); the optional flags taken",
        subs=(("[--memory_maze_context=100 --memory_maze_seeds=1000000:1000004 "
               "--train_baselines=none,frame_bank]",
               "--memory_maze_context=100 --memory_maze_seeds=1000000:1000004 "
               "--train_baselines=none,frame_bank"),)),
    # ---- launch/README.md
    "launch_synopsis": Doc(
        "python -m mirage_jax.main --config=experiments/<name>.py[:autoencoder|:denoiser] --workdir=DIR "
        "[--config.a.b=value ...]", L, "dry", f"a synopsis; <name> -> pod_v5e_256, stage 1 ({POD_WHY})",
        subs=(("<name>", "pod_v5e_256"), ("[:autoencoder|:denoiser]", ":autoencoder"), ("DIR", "runs/x"))),
    "launch_base_ae": Doc("python -m mirage_jax.main --config=experiments/base.py:autoencoder --workdir=runs/ae",
                          L, "dry", "experiments/base.py is a GPU-cluster config (hours)"),
    "launch_base_export": Doc("python -m mirage_jax.export --workdir=runs/ae --output=runs/ae_export",
                              L, "dry", "needs the base.py run above"),
    "launch_base_dn": Doc(
        "python -m mirage_jax.main --config=experiments/base.py:denoiser --workdir=runs/dit "
        "--config.denoiser.autoencoder_checkpoint=runs/ae_export", L, "dry",
        "experiments/base.py is a GPU-cluster config (hours)"),
    "local_multiprocess": Doc(
        "launch/local_multiprocess.sh 2 4 experiments/tiny_cpu.py runs/tiny_mp --config.train.steps=50",
        L, "run", f"{STEPS_WHY} (2 instead of 50); PY -> this interpreter (the script's default is a "
        "fresh clone's .venv/bin/python)", flags=(STEPS,)),
    "tpu_vm": Doc(
        "TPU_NAME=my-v5p ZONE=us-east5-a CONFIG=experiments/pod_v5p_128.py:denoiser "
        "WORKDIR=gs://BUCKET/runs/pod_dit launch/tpu_vm.sh --config.data.data_dir=gs://BUCKET/datasets "
        "--config.denoiser.autoencoder_checkpoint=gs://BUCKET/exports/pod_ae", L, "script", POD_WHY),
    "xpk": Doc(
        "CLUSTER=my-cluster TPU_TYPE=v5p-128 NUM_SLICES=1 IMAGE=gcr.io/my-proj/mirage_jax:latest "
        "CONFIG=experiments/pod_v5p_128.py:denoiser WORKDIR=gs://BUCKET/runs/pod_dit launch/xpk.sh "
        "--config.data.data_dir=gs://BUCKET/datasets "
        "--config.denoiser.autoencoder_checkpoint=gs://BUCKET/exports/pod_ae", L, "script", POD_WHY),
    "slurm": Doc(
        "CONFIG=experiments/base.py:denoiser WORKDIR=/shared/runs/base_dit sbatch launch/slurm.sbatch "
        "--config.denoiser.autoencoder_checkpoint=/shared/exports/base_ae", L, "script",
        "needs a Slurm GPU cluster"),
    # ---- README: WorldScore and RealEstate10K
    "worldscore_generate": Doc(
        "python -m mirage_jax.worldscore_generate --checkpoint=EXPORT --depth_model=DEPTH_EXPORT "
        "--cases=DATA_PATH/WorldScore-Dataset --output_dir=MODEL_PATH/mirage/worldscore_output "
        "[--visual_movement=static,dynamic] [--frames=50] [--num_cases=N]", R, "dry",
        "needs WorldScore's dataset and a depth model; tests/test_worldscore.py generates its "
        "case format end to end with tiny random exports"),
    "evaluate_re10k": Doc(
        "python -m mirage_jax.evaluate_re10k --checkpoint=EXPORT --depth_model=DEPTH_EXPORT "
        "--clips=re10k/test --output_dir=OUT [--num_frames=25] [--stride=1] [--num_clips=N]", R, "dry",
        "needs RealEstate10K clips and a depth model; tests/test_worldscore.py runs the protocol "
        "end to end on tiny clips with tiny random exports"),
    "pip_tpu": Doc("pip install -e '.[tpu]'", L, "pip", "installs (the suite's venv has it)"),
    "aot_v5p": Doc("python -m mirage_jax.aot --config=experiments/pod_v5p_128.py:denoiser --topology=v5p:4x4x4",
                   L, "dry", "compiling the pod step takes many minutes here"),
    "aot_v5e": Doc("python -m mirage_jax.aot --config=experiments/pod_v5e_256.py:denoiser --topology=v5e:16x16",
                   L, "dry", "compiling the pod step takes many minutes here"),
}

# The chains, in the docs' order; every ``run`` entry is in exactly one.
CHAINS = {
    "readme_table": ("build", "table_train_ae", "table_export_ae", "table_train_dn", "table_export_dn",
                     "table_train_depth", "table_geometry", "table_generate", "table_evaluate",
                     "own_geometry_dataset", "own_generate", "own_geometry_files"),
    "gcs": ("gs_train_ae", "gs_export_ae", "gs_train_dn", "gs_export_dn", "gs_geometry", "gs_generate"),
    "beam_local": ("beam_local",),
    "local_multiprocess": ("local_multiprocess",),
}


def _matches(entry: Doc, command: str) -> bool:
  return (re.fullmatch(entry.text, command) is not None) if entry.loose else entry.text == command


def documented() -> set[tuple[str, str]]:
  return {(doc, c) for doc in DOCS for c in extract_commands(doc)}


# ----------------------------------------------------------------------------- making a command


def concrete(name: str) -> tuple[dict[str, str], list[str]]:
  """(environment assignments, argv) of entry ``name``: the documented text with its
  substitutions, the optional ``[...]`` parts it does not name left out, its size flags."""
  entry = COMMANDS[name]
  text = entry.example or entry.text
  for old, new in entry.subs:
    assert old in text, f"{name}: {old!r} is not in the documented command"
    text = text.replace(old, new)
  text = re.sub(r"\s*\[[^\]]*\]", "", text)
  words = shlex.split(text)
  env = {}
  while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
    key, _, value = words.pop(0).partition("=")
    env[key] = value
  for flag in entry.flags:
    key = flag.split("=")[0] + "="
    at = [i for i, w in enumerate(words) if w.startswith(key)]
    if at:
      words[at[0]] = flag
    else:
      words.append(flag)
  return env, words


def _python_argv(words: list[str]) -> list[str]:
  """``python -m X ...`` / ``.venv/bin/python -m X ...`` -> ``[X, ...]`` for the dry run."""
  assert words[0].endswith("python") and words[1] == "-m", words
  return words[2:]


def dry_run(commands: list[list[str]], tmp_path: Path, env: dict | None = None) -> list[dict]:
  """tests/doc_dry_run.py over ``commands`` (``[module, args...]``): one result each."""
  spec = tmp_path / "dry.json"
  spec.write_text(json.dumps(commands))
  result = subprocess.run([sys.executable, "-m", "tests.doc_dry_run", str(spec)], cwd=ROOT,
                          env=dict(env or os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=DEADLINE_S)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
  assert len(rows) == len(commands), result.stdout[-3000:]
  return rows


# ----------------------------------------------------------------------------- fast tests


def test_docs_and_table_agree():
  docs = documented()
  # Fenced, indented and table commands are all found (a parser that silently finds nothing
  # would make the rest of this file vacuous).
  assert len(docs) >= 35, sorted(docs)
  assert {"README.md", "launch/README.md"} <= {doc for doc, _ in docs}
  unmatched = sorted(f"{doc}: {c}" for doc, c in docs
                     if not any(doc in e.files and _matches(e, c) for e in COMMANDS.values()))
  assert not unmatched, ("commands in the docs that tests/test_doc_commands.py does not run: add "
                         "each to COMMANDS (how it is run and why):\n  " + "\n  ".join(unmatched))
  stale = sorted(f"{n}: {e.text}" for n, e in COMMANDS.items()
                 if not any(doc in e.files and _matches(e, c) for doc, c in docs))
  assert not stale, "COMMANDS entries no longer in the docs: remove or update\n  " + "\n  ".join(stale)
  for name, entry in COMMANDS.items():
    assert entry.why and entry.how in ("run", "dry", "script", "make", "pip"), name
    if entry.loose:
      assert re.fullmatch(entry.text, entry.example), f"{name}: its example does not match"
  in_chains = [n for chain in CHAINS.values() for n in chain]
  runs = [n for n, e in COMMANDS.items() if e.how == "run"]
  assert sorted(in_chains) == sorted(runs), "each run entry in exactly one chain"


def test_continuations_are_joined_as_the_shell_joins_them():
  assert _logical_lines(["a --x=1 \\", "    --y=2", "b --o=p,\\", "q=r"]) == [
      "a --x=1     --y=2", "b --o=p,q=r"]
  assert normalise("make main   # fresh clone") == "make main"
  assert _is_command("CONFIG=x WORKDIR=y sbatch launch/slurm.sbatch")
  assert not _is_command("launch/ TPU VM, xpk/GKE") and not _is_command("mirage_jax/")


def test_launch_scripts_parse():
  for script in sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm.sbatch"]:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, f"{script}: {result.stderr}"
    assert os.access(script, os.X_OK) or script.suffix == ".sbatch", f"{script} is not executable"


def test_pip_commands_name_real_extras():
  sys.path.insert(0, str(ROOT))
  try:
    spec = subprocess.run([sys.executable, "-c", "import runpy, json, setuptools; "
                           "setuptools.setup = lambda **k: print(json.dumps(k['extras_require']));"
                           "runpy.run_path('setup.py')"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
  finally:
    sys.path.remove(str(ROOT))
  extras = json.loads(spec.stdout.strip().splitlines()[-1])
  for name, entry in COMMANDS.items():
    if entry.how != "pip":
      continue
    for group in re.findall(r"\.\[([^\]]+)\]", entry.text):
      for extra in group.split(","):
        assert extra in extras, f"{name}: no extra {extra!r} in setup.py ({sorted(extras)})"


def test_make_targets_run_documented_commands(tmp_path):
  commands = []
  for name in ("make_main", "make_test"):
    target = COMMANDS[name].text.split()[1]
    result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if " -m " in l and "pip" not in l]
    assert lines, result.stdout
    if name == "make_test":
      assert re.search(r"-m pytest .*\btests\b", lines[-1]), lines
    else:
      assert "-m mirage_jax.main_job --workdir=runs/tiny" in lines[-1], lines
      commands.append(_python_argv(shlex.split(lines[-1])))
  for row in dry_run(commands, tmp_path):
    assert row["status"] == 0, row


@pytest.mark.timeout(300)
def test_dry_commands(tmp_path):
  """Every ``dry`` entry starts (exit 0) up to its work; the Dataflow build stops only at
  the documented apache-beam[gcp] install."""
  names = [n for n, e in COMMANDS.items() if e.how == "dry"]
  rows = dry_run([_python_argv(concrete(n)[1]) for n in names], tmp_path)
  failed = []
  for name, row in zip(names, rows):
    err = [l for l in row["stderr"].splitlines() if l.startswith("error:")]
    if name == "beam_dataflow" and row["status"] == 2 and len(err) == 1 and \
        "pip install 'apache-beam[gcp]==2.77.0'" in err[0]:
      continue  # the README's step before this command
    if row["status"] != 0:
      failed.append(f"{name}: exit {row['status']}: {row['argv']}\n    {row['stderr'][-600:]}")
  assert not failed, "\n".join(failed)


@pytest.mark.timeout(300)
def test_launchers_run_the_documented_command(tmp_path):
  """tpu_vm.sh, xpk.sh and sbatch slurm.sbatch as documented, with stub cluster tools; what
  each would run on every host passes the dry run."""
  stubs = tmp_path / "bin"
  stubs.mkdir()
  log = tmp_path / "calls.jsonl"
  record = ("#!" + sys.executable + "\nimport json, os, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")
  for tool in ("gcloud", "xpk", "srun"):
    (stubs / tool).write_text(record)
  # sbatch runs the batch script here, as Slurm would on the first node.
  (stubs / "sbatch").write_text(f"#!/usr/bin/env bash\nSLURM_SUBMIT_DIR=$PWD exec bash \"$@\"\n")
  for tool in stubs.iterdir():
    tool.chmod(0o755)
  commands, names = [], []
  for name in ("tpu_vm", "xpk", "slurm"):
    log.write_text("")
    env, words = concrete(name)
    env = dict(os.environ, **env, PATH=f"{stubs}:{os.environ['PATH']}",
               REPO_URL="https://example.com/mirage_jax.git")  # a fresh clone's origin
    result = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{name}: {result.stderr}"
    calls = [json.loads(l) for l in log.read_text().splitlines()]
    assert len(calls) == 1, (name, calls)
    tool, *args = calls[0]
    if tool == "srun":
      inner = args
    else:
      script = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
      line = next(l for l in script.splitlines() if "-m mirage_jax.main" in l)
      if line.rstrip().endswith("\\"):  # tpu_vm.sh continues the command on the next line
        following = script.splitlines()[script.splitlines().index(line) + 1]
        line = line.rstrip()[:-1] + following
      inner = shlex.split(line)
    inner = inner[inner.index("-m") - 1:]
    assert "--distributed=auto" in inner, (name, inner)
    commands.append(_python_argv(inner))
    names.append(name)
  for name, row in zip(names, dry_run(commands, tmp_path)):
    assert row["status"] == 0, (name, row)


# ----------------------------------------------------------------------------- chains


def _env(extra: dict | None = None) -> dict[str, str]:
  """A user's shell on one CPU: this checkout importable, one device, the suite's cache."""
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(1), TF_CPP_MIN_LOG_LEVEL="3",
              **(extra or {}))


def run_entry(name: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs entry ``name`` in ``cwd``; asserts exit status 0."""
  assignments, words = concrete(name)
  if words[0] == "python":
    words = [sys.executable, *words[1:]]
  result = subprocess.run(words, cwd=cwd, env=dict(env or _env(), **assignments),
                          capture_output=True, text=True, timeout=DEADLINE_S)
  assert result.returncode == 0, (f"{name} failed as run: {shlex.join(words)}\n"
                                  f"{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
  return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
  """A folder standing for a fresh clone: the repository's configs, launchers and setup.py,
  nothing built; the README's build command run in it as written."""
  root = tmp_path_factory.mktemp("clone")
  for name in ("experiments", "launch", "setup.py"):
    (root / name).symlink_to(ROOT / name)
  run_entry("build", root)
  assert (root / "data" / "procedural_rooms").is_dir()
  return root


def _export_written(path: Path) -> None:
  assert (path / "config.json").is_file() and (path / "params").is_dir(), sorted(path.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_table_chain(clone):
  """build -> train (stage 1) -> export -> train (stage 2) -> export -> train a depth
  estimator -> make_geometry -> generate -> evaluate, then "From make main to your own
  generate"."""
  for name in CHAINS["readme_table"][1:]:
    if name == "own_geometry_files":
      _write_own_files(clone)
    result = run_entry(name, clone)
    if name.startswith("table_train"):
      workdir = clone / {"table_train_ae": "runs/ae", "table_train_dn": "runs/dit",
                         "table_train_depth": "runs/depth"}[name]
      steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
      assert steps[-1] == 2, steps
    elif name.startswith("table_export"):
      _export_written(clone / ("exports/ae" if name.endswith("ae") else "exports/dit"))
    elif name == "table_geometry":
      with np.load(clone / "geometry.npz") as g:
        assert g["poses_c2w"].shape == (12, 4, 4)
    elif name in ("table_generate", "own_generate"):
      out = clone / ("out/generate" if name == "table_generate" else "runs/tiny/generate/clip0")
      assert {"video.mp4", "depth.npz"} <= set(os.listdir(out)), os.listdir(out)
    elif name == "table_evaluate":
      assert (clone / "out/eval/index.html").is_file()
      assert "report: " in result.stdout + result.stderr
    elif name == "own_geometry_dataset":
      assert (clone / "runs/tiny/clip0/geometry.npz").is_file()
    elif name == "own_geometry_files":
      with np.load(clone / "mine/geometry.npz") as g:
        assert int(g["known_frames"]) == 1 and g["poses_c2w"].shape == (5, 4, 4)


def _write_own_files(folder: Path) -> None:
  """A user's first_frame.png, depth.npy and RealEstate10K cameras.txt (5 cameras)."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  from data_pipelines import procedural  # pylint: disable=g-import-not-at-top
  from tests.test_make_geometry import _re10k_text  # pylint: disable=g-import-not-at-top
  clip = procedural.render_clip(11, 5, 32, 32, trajectory="loop")
  iio.imwrite(folder / "first_frame.png", clip["frames"][0])
  np.save(folder / "depth.npy", clip["depths"][0])
  (folder / "cameras.txt").write_text(_re10k_text(clip))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gcs_chain(clone, gcs):  # pylint: disable=redefined-outer-name
  """README "Cloud Storage (gs://) paths": the whole block on the emulator."""
  from mirage_jax import paths  # pylint: disable=g-import-not-at-top
  assert dict(COMMANDS["gs_train_ae"].subs)["BUCKET"] == test_gcs.BUCKET
  for name in CHAINS["gcs"]:
    run_entry(name, clone, _env({k: gcs[k] for k in test_gcs._client_env("x")}))  # pylint: disable=protected-access
    if name.startswith("gs_train"):
      workdir = f"gs://{test_gcs.BUCKET}/runs/" + ("tiny_ae" if name.endswith("ae") else "tiny_dit")
      assert test_gcs._committed_steps(workdir)[-1] == 2  # pylint: disable=protected-access
  bucket = f"gs://{test_gcs.BUCKET}"
  for export in ("exports/tiny_ae", "exports/tiny_dit"):
    assert paths.exists(f"{bucket}/{export}/config.json")
  assert (clone / "clip" / "geometry.npz").is_file()
  assert {"video.mp4", "depth.npz"} <= set(paths.listdir(f"{bucket}/videos/clip"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_beam_local_build(clone):
  result = run_entry("beam_local", clone)
  assert "built " in result.stdout, result.stdout
  assert (clone / "beam_data" / "procedural_rooms").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_multiprocess(clone):
  """launch/local_multiprocess.sh: 2 processes x 4 fake devices, the tiny config's dataset."""
  run_entry("local_multiprocess", clone, _env({"PY": sys.executable}))
  steps = [json.loads(l)["step"] for l in
           (clone / "runs/tiny_mp/metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 2, steps
