"""Mirage on Wan2.2-TI2V-5B: fine-tuning VACE and LoRA on a frozen Wan base (the reference's
recipe), at the reference's shapes, sharded over a pod.

  --config=experiments/mirage_wan22_5b.py[:<variant>[,<mesh>][,<recipe>]]

``<variant>``: 'ti2v_5b' (default: 704x1280 clips, 33 target video frames = 9 latent frames)
or 'tiny' (the test-size networks of the same family, 64x64 frames, trains on CPU).
``<mesh>``: 'v5p_128' (64 chips, default for ti2v_5b) or 'v5e_256' (256 chips); the tiny
variant uses every local device as FSDP.

``<recipe>``, the clean context the target is denoised with (the reference's code and paper
differ here):

* 'paper' (default): the paper's setup: 8 preceding video frames (2 latent frames) and up to
  8 reference frames (``max_refs`` of the reference's data config) as clean context. Its
  latent dataset: ``encode_latents --preceding_frames=8 --num_references=8``.
* 'script': what the reference's ``scripts/train.py`` trains with by default
  (``--max-reference-frames 0 --max-preceding-frames 0``): no references, no preceding
  frames; the target is conditioned on the memory read, the first frame and the text only.
  It reads the same latent dataset and drops the preceding latents at load
  (``data.drop_preceding``), as the reference's loader does.

The tiny variant keeps its own small context (5 preceding video frames, no references) under
'paper'.

Pipeline: ``python -m mirage_jax.convert_wan`` (released files -> ``EXPORT/vae``,
``EXPORT/dit``), ``python -m data_pipelines.encode_latents --vae=EXPORT/vae`` (posed clips ->
latent clips), then ``python -m mirage_jax.main --config=...:ti2v_5b
--config.denoiser.base_checkpoint=EXPORT/dit --config.data.data_dir=LATENTS``; the second
stage (``--config.denoiser.train_stages=lora``) takes the first stage's export as its base.
Every field can be overridden on the command line.
"""

from __future__ import annotations

from experiments import wan22_ti2v_5b

MESHES = {
    # v5p-128 = 64 chips (95 GiB HBM each): FSDP 16 x context 4, 4 clips per FSDP shard
    # (fsdp 64 without context does not compile with libtpu 0.0.52; BENCHMARKS.md).
    "v5p_128": dict(mesh=dict(data=1, fsdp=16, context=4, tensor=1), batch_size=64),
    # v5e-256 = 256 chips (16 GiB each): FSDP 64 x context 4 (the 16.7k-token sequence split
    # over 4 chips), one clip per 4 chips.
    "v5e_256": dict(mesh=dict(data=1, fsdp=64, context=4, tensor=1), batch_size=64),
}


# Clean context per recipe (module docstring): video frames before the target, reference frames.
RECIPES = {
    "paper": dict(preceding_frames=8, reference_frames=8),
    "script": dict(preceding_frames=0, reference_frames=0),
}


def parse_arg(arg: str | None) -> tuple[str, str | None, str]:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  recipe = parts.pop() if len(parts) > 1 and parts[-1] in RECIPES else "paper"
  variant = parts[0] if parts else "ti2v_5b"
  mesh = parts[1] if len(parts) > 1 else ("v5p_128" if variant == "ti2v_5b" else None)
  if variant not in wan22_ti2v_5b.VARIANTS or (mesh is not None and mesh not in MESHES) or len(parts) > 2:
    raise ValueError(f"config argument must be '<variant>[,<mesh>][,<recipe>]' with variant in "
                     f"{wan22_ti2v_5b.VARIANTS}, mesh in {tuple(MESHES)} and recipe in "
                     f"{tuple(RECIPES)}, got {arg!r}")
  return variant, mesh, recipe


def get_config(arg=None):
  variant, mesh, recipe = parse_arg(arg)
  c = wan22_ti2v_5b.get_config(f"denoiser,{variant}")
  d = c.denoiser
  d.base_checkpoint = ""  # a convert_wan DiT export (or a fine-tune export of one)
  d.train_stages = ("vace",)  # the reference's --stage: ('vace',), then ('lora',)
  d.target_frames = 33  # video frames (1 + 4 k): 9 latent frames
  # The recipe's clean context (RECIPES): video frames before the target (8: 2 latent
  # frames) and reference latent frames, each an image encoded alone.
  d.preceding_frames = RECIPES[recipe]["preceding_frames"]
  d.reference_frames = RECIPES[recipe]["reference_frames"]
  c.data.drop_preceding = recipe == "script"  # the dataset's preceding latents, unused
  d.text_len = 512  # umT5 tokens
  # The empty prompt's umT5 embedding, .npy (Lt <= text_len, text_dim); default: the latent
  # dataset's, else the base export's, else encoded with text_encoder + tokenizer (also
  # found along the base export chain); zeros, with a warning, only when none is known.
  d.empty_text = ""
  d.text_encoder = ""  # a convert_text umT5 export
  d.tokenizer = ""  # its google/umt5-xxl tokenizer folder
  d.caption_dropout = 0.1
  d.first_frame_clean = True
  d.memory_write = "first_target"  # the reference's: the clean first target latent
  d.vace_coverage = False  # ours: a 97th VACE channel (1 in holes); off for released weights
  d.model.lora_dropout = 0.05
  c.memory.backend = "mirage"
  c.optimizer.ema_decay = 0.0  # the reference keeps no EMA (the export is then the params)
  c.data.dataset = "wan_latents"
  c.data.data_dir = "data/wan_latents"
  c.data.shuffle = True
  if variant == "ti2v_5b":
    c.data.resolution = (704, 1280)
    c.train.steps = 10000
    c.train.log_every = 10
    c.checkpoint.every = 1000
    m = MESHES[mesh]
    c.mesh = m["mesh"]
    c.data.batch_size = m["batch_size"]
  else:
    c.data.resolution = (64, 64)
    c.data.batch_size = 2
    # Batch over 2 devices (FSDP), the rest of the host's devices on the tensor axis.
    c.mesh = dict(data=1, fsdp=2, context=1, tensor=-1)
    d.target_frames = 9  # 3 latent frames
    if recipe == "paper":
      d.preceding_frames = 5  # 2 latent frames
    d.reference_frames = 0
    d.text_len = 8
    d.model.lora_rank = 4
    d.model.lora_alpha = 4.0
    d.train_stages = ("vace", "lora")
    c.train.steps = 200
    c.train.log_every = 20
    c.train.tensorboard = False
    c.checkpoint.update(every=100, keep=2, async_save=False)
    c.optimizer.learning_rate = 1e-3  # tiny random base: a visible fall in a few hundred steps
    c.optimizer.end_learning_rate = 1e-3
  h, w = c.data.resolution
  lat_p = (d.preceding_frames - 1) // 4 + 1
  # Room for every source latent cell the memory is written from.
  c.memory.settings.capacity = (h // 16) * (w // 16) * (1 + lat_p)
  c.memory.settings.feature_dtype = "float32"
  c.data.num_frames = d.target_frames + d.preceding_frames  # video frames per window (info)

  return c
