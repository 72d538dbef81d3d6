"""AOT: the real train step compiles for a small TPU topology on this CPU host (needs libtpu)."""

import importlib.util

import pytest

from tests.test_train import tiny_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e .[tpu])")


@pytest.mark.usefixtures("tpu_compiler")
def test_compile_for_v5e_2x2(tmp_path):
  import jax
  from mirage_jax import aot
  from mirage_jax.errors import InputError
  from mirage_jax.training import executables
  from mirage_jax.training import mesh as mesh_lib
  config = tiny_config()
  config.mesh = dict(data=1, fsdp=2, context=1, tensor=2)
  path = str(tmp_path / "v5e.jaxexe")
  report = aot.compile_report(config, "v5e:2x2", save_executable_to=path)
  assert report["executable_bytes"] > 0
  # The TPU executable is for a TPU run of this config; this CPU host refuses it, named.
  devices = jax.devices()[:4]
  key = executables.executable_key(config, devices, dict(mesh_lib.build_mesh(config, devices).shape))
  with pytest.raises(InputError, match="platform"):
    executables.load_executable(path, key, devices)
  assert report["devices"] == 4
  assert report["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 2}
  assert 0 < report["memory_per_device_gib"] < report["hbm_per_device_gib"] and report["fits"]
  assert report["xla_tflops_per_device"] > 0 and report["analytic_tflops_per_device"] > 0
  assert 0 < report["roofline_mfu"] <= 1


def test_unknown_topology_is_an_input_error():
  from mirage_jax import aot
  from mirage_jax.errors import InputError
  with pytest.raises(InputError, match="topology"):
    aot.topology_devices("v9x:2x2")


@pytest.mark.usefixtures("tpu_compiler")
def test_hybrid_mesh_puts_dcn_axis_across_slices():
  from mirage_jax import aot
  from mirage_jax.training import mesh as mesh_lib
  config = tiny_config()
  config.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  config.dcn_mesh = dict(data=2, fsdp=1, context=1, tensor=1)
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  mesh = mesh_lib.build_mesh(config, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  grid = mesh.devices.reshape(2, 4)
  for row in range(2):  # fsdp (ICI) stays inside one slice; data (DCN) spans the two
    assert len({d.slice_index for d in grid[row]}) == 1
  assert grid[0, 0].slice_index != grid[1, 0].slice_index
