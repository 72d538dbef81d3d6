"""main_job: a training stopped early (preempted) is never exported as if finished; the small
family's job end to end at reduced size."""

import html
import os
import re

import ml_collections
import pytest

from mirage_jax import checkpoint, main_job
from mirage_jax.training import loop as loop_lib


def _fake_training(monkeypatch, saved_step: int):
  """train_and_evaluate that does nothing; export_params that exports ``saved_step``."""
  monkeypatch.setattr(loop_lib, "train_and_evaluate", lambda config, workdir: {"loss": 0.5})

  def export(workdir, output, **kw):
    os.makedirs(output)
    with open(os.path.join(output, "config.json"), "w") as f:
      f.write("{}")
    return saved_step
  monkeypatch.setattr(checkpoint, "export_params", export)


def test_a_preempted_training_is_not_exported(tmp_path, monkeypatch, capsys):
  config = ml_collections.ConfigDict(dict(train=dict(steps=10)))
  _fake_training(monkeypatch, saved_step=4)  # SIGTERM: the loop saved step 4 and returned
  with pytest.raises(SystemExit) as e:
    main_job.train_and_export(config, str(tmp_path), "denoiser")
  assert e.value.code == 143
  assert not (tmp_path / "denoiser_export").exists()  # the next run resumes, not reuses
  assert "stopped at step 4 of 10" in capsys.readouterr().out


def test_a_finished_training_is_exported_and_then_reused(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict(dict(train=dict(steps=10)))
  _fake_training(monkeypatch, saved_step=10)
  out = main_job.train_and_export(config, str(tmp_path), "denoiser")
  assert out == os.path.join(str(tmp_path), "denoiser_export") and os.path.isdir(out)
  _fake_training(monkeypatch, saved_step=-1)  # not called again: the export is reused
  assert main_job.train_and_export(config, str(tmp_path), "denoiser") == out


def test_lpips_flags_reach_the_evaluations_and_redo_one_without_lpips(tmp_path, monkeypatch):
  """``--lpips_backbone`` is passed on; an earlier evaluation without LPIPS is then redone,
  one with it reused (no subprocess: ``_run_command`` records)."""
  import json  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  ran = []
  monkeypatch.setattr(main_job, "_run_command", lambda module, *args: ran.append(args))
  out = tmp_path / "objects"
  out.mkdir()
  (out / "metrics.json").write_text(json.dumps(dict(benchmark="objects", lpips=None, summary={})))
  backbone = str(tmp_path / "alexnet-owt-7be5be79.pth")
  with flagsaver.flagsaver():
    flags.FLAGS(["main_job"])
    main_job._evaluate(["--benchmark=objects"], str(out), lpips_scored=True)
    assert ran == []  # no weights asked for: reused
    flags.FLAGS(["main_job", f"--lpips_backbone={backbone}", "--lpips_net=alex"])
    args = ["--benchmark=objects", *main_job._LPIPS.args()]
    assert args[1:] == [f"--lpips_backbone={backbone}", "--lpips_net=alex"]
    main_job._evaluate(args, str(out), lpips_scored=True)
    assert len(ran) == 1 and ran[0][-2:] == tuple(args[1:])  # redone, with the weights
    (out / "metrics.json").write_text(json.dumps(dict(benchmark="objects", summary={},
                                                      lpips=dict(net="alex"))))
    main_job._evaluate(args, str(out), lpips_scored=True)
    assert len(ran) == 1  # has LPIPS: reused


SMALL_ARGS = ("--autoencoder_steps=20", "--denoiser_steps=20", "--num_trajectories=2",
              "--num_frames=20", "--lengths=20,40", "--object_trajectories=1",
              "--object_frames=40", "--backends=none,mirage,voxel")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_small_family_main_job_end_to_end(tmp_path):
  """``make main``'s job at reduced size (20 steps per stage, 2 loops of 20 frames, one loop
  of 40 frames with objects): every stage runs for real (no mocks), every table and claim is
  printed, the report links each evaluation, and a second run reuses everything."""
  import json  # pylint: disable=g-import-not-at-top
  from tests.test_generate import run_cli  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "tiny"
  result = run_cli("mirage_jax.main_job", f"--workdir={workdir}", *SMALL_ARGS)
  assert result.returncode == 0, result.stderr[-4000:]
  out = result.stdout
  for stage in ("1/4 dataset", "2/4 autoencoder", "3/4 denoiser", "4/4 evaluation"):
    assert f"=== {stage}" in out, out[-3000:]
  for export in ("autoencoder_export", "denoiser_export"):
    assert (workdir / export / "config.json").exists(), export
  # Training ran the asked steps: the denoiser's last logged step is 20.
  with open(workdir / "denoiser" / "metrics.jsonl") as f:
    steps = [json.loads(line).get("step") for line in f if line.strip()]
  assert max(s for s in steps if s is not None) == 20, steps
  # The revisit/cost table has every backend's row and both lengths' cost columns.
  summary = json.loads((workdir / "eval" / "revisit" / "metrics.json").read_text())["revisit"]["summary"]
  assert {"none", "mirage", "voxel"} <= set(summary)
  table = out[out.index("| row "):]
  assert "cache_MB@20" in table and "s/chunk@40" in table, table[:2000]
  for row in ("none (memory off)", "mirage", "voxel"):
    assert re.search(rf"^\|\s*{re.escape(row)}\s*\|", table, re.M), table[:2000]
  assert "moving objects:" in out
  # Every claim is printed with its verdict, and the summary page shows the same verdicts.
  claims = [line.strip() for line in out.splitlines() if line.strip().startswith(("[PASS]", "[FAIL]"))]
  assert any("voxel revisit PSNR" in c for c in claims), claims
  assert any("chunk" in c for c in claims), claims  # the scaling claim
  page = (workdir / "eval" / "index.html").read_text()
  for claim in claims:  # the page shows each claim with the same verdict
    verdict, text = claim[1:5], html.escape(claim.split("] ", 1)[1])
    assert re.search(verdict + r"</span>\s*" + re.escape(text), page), claim
  for name in ("revisit", "scaling", "objects"):
    assert (workdir / "eval" / name / "index.html").exists(), name
    assert f"{name}/index.html" in page, name
  assert f"report: {(workdir / 'eval' / 'index.html').resolve()}" in out

  again = run_cli("mirage_jax.main_job", f"--workdir={workdir}", *SMALL_ARGS)
  assert again.returncode == 0, again.stderr[-4000:]
  assert "reused " in again.stdout and again.stdout.count("reusing") >= 4, again.stdout[-3000:]
