"""The main job's moving-objects claims, read from an objects metrics.json."""

import json

from mirage_jax import main_job


def _write(path, rows):
  summary = dict(rows, revisit_frames=10, ghost_frames=8, reentry_events=2, reentry_frames=5)
  path.write_text(json.dumps({"summary": summary}))


def test_object_claims_need_margins(tmp_path):
  path = tmp_path / "metrics.json"
  assert main_job._object_claims(str(path)) == {}  # the benchmark did not run
  row = lambda ghost, psnr, ident: dict(ghost_psnr=ghost, object_psnr_reentry=psnr,
                                        identity_consistency=ident)
  _write(path, {"mirage": row(19.0, 16.0, 0.3), "voxel": row(20.0, 16.0, 0.3),
                "voxel+objects": row(20.0, 16.4, 0.5)})
  claims = list(main_job._object_claims(str(path)).values())
  assert claims == [True, False, True]  # +0.4 dB is inside the 0.5 dB margin
  _write(path, {"mirage": row(19.0, 16.0, 0.3), "voxel": row(18.0, 16.0, 0.3),
                "voxel+objects": row(18.0, 17.0, 0.3)})
  assert list(main_job._object_claims(str(path)).values()) == [False, True, False]
