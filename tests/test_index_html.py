"""index.html of an evaluation: built from a tiny evaluation, opened in headless Chromium.

Debian's ``chromium`` must be installed (``make test`` installs it and sets
MIRAGE_NO_SKIPS=1, so there a missing browser fails the run instead of skipping).
"""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from mirage_jax.evaluation import index_html, revisit, scaling
from tests.chromium import Browser, find_chromium
from tests.test_generate import run_cli, save_tiny_export


def _chromium() -> str:
  path = find_chromium()
  if path is None:
    pytest.skip("no chromium on PATH (apt-get install chromium)")
  return path


def test_claims_follow_the_numbers():
  row = lambda p: {"psnr_revisit": p}
  assert revisit.claims(dict(none=row(10.0), voxel=row(14.5), mirage=row(15.0))) == {
      "voxel revisit PSNR >= none (memory off) + 4 dB": True, "voxel revisit PSNR >= mirage - 1 dB": True}
  assert revisit.claims(dict(none=row(10.0), voxel=row(13.9), mirage=row(15.0))) == {
      "voxel revisit PSNR >= none (memory off) + 4 dB": False, "voxel revisit PSNR >= mirage - 1 dB": False}
  assert revisit.claims(dict(none=row(10.0), voxel=row(None))) == {
      "voxel revisit PSNR >= none (memory off) + 4 dB": False}  # no score: not a pass
  assert revisit.claims(dict(mirage=row(1.0))) == {}
  e = lambda b, n, c, s: dict(backend=b, frames=n, cache_bytes=c, memory_seconds_per_chunk=0.0,
                              chunk_seconds=s)
  entries = [e("voxel", 64, 100, 1.0), e("voxel", 1024, 100, 1.1), e("mirage", 1024, 1000, 3.0)]
  assert list(scaling.claims(entries).values()) == [True, True]
  entries[1] = e("voxel", 1024, 101, 1.3)
  assert list(scaling.claims(entries).values()) == [False, False]
  assert scaling.claims([]) == {}


@pytest.mark.slow
def test_report_of_a_tiny_evaluation_plays_in_chromium(tmp_path):
  binary = _chromium()
  export = save_tiny_export(str(tmp_path / "export"))
  out = tmp_path / "revisit"
  result = run_cli("mirage_jax.evaluate", f"--checkpoint={export}", "--benchmark=revisit",
                   "--procedural_seeds=100001:100002", "--num_frames=24",
                   "--backends=none,mirage,voxel", "--nooracle", f"--output_dir={out}")
  assert result.returncode == 0, result.stderr
  page = out / "index.html"
  assert f"report: {page}" in result.stdout
  text = page.read_text()
  # Every claim these rows allow, with its verdict; the command and config that made it.
  assert len(re.findall(r'class="(?:pass|fail)">(?:PASS|FAIL)<', text)) == 2
  assert "voxel revisit PSNR &gt;= none (memory off) + 4 dB" in text and "--backends=none,mirage,voxel" in text
  assert '&quot;stage&quot;: &quot;denoiser&quot;' in text
  videos = re.findall(r'<video src="([^"]+)"', text)
  assert videos == [f"videos/seed100001/{r}.mp4" for r in
                    ("ground_truth", "none", "mirage", "voxel", "composite")]
  assert "http://" not in text and "https://" not in text  # nothing fetched from a network

  with Browser(binary) as browser:
    browser.call("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1,
                 mobile=False)
    browser.load(page.as_uri())
    media = browser.evaluate("""Promise.all([...document.querySelectorAll('video')].map(v =>
        new Promise(done => {
          const report = () => done({src: v.getAttribute('src'), duration: v.duration,
                                     width: v.videoWidth, error: v.error && v.error.message});
          if (v.readyState >= 1 || v.error) report();
          else { v.addEventListener('loadedmetadata', report); v.addEventListener('error', report); }
        })))""")
    images = browser.evaluate("""Promise.all([...document.images].map(i => i.decode().then(
        () => ({src: i.getAttribute('src'), width: i.naturalWidth}),
        () => ({src: i.getAttribute('src'), width: 0}))))""")
    # Decoding, not just metadata: a video advances when played.
    played = browser.evaluate("""(async () => { const v = document.querySelector('video');
        v.currentTime = 0; await v.play();
        await new Promise(r => setTimeout(r, 500)); return v.currentTime; })()""")
    browser.drain(0.5)
    shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"), np.float32)
    problems = browser.problems()
  assert problems == []
  assert len(media) == 5
  for m in media:
    assert m["error"] is None and m["duration"] > 0 and m["width"] > 0, m
  assert {i["src"] for i in images} == {"quality_vs_frame.png", "ssim_vs_frame.png",
                                         "first_visit_vs_frame.png"}
  assert all(i["width"] > 0 for i in images), images
  assert played > 0
  assert shot.shape[:2] == (900, 1200) and shot.var() > 0


def test_scaling_and_objects_pages(tmp_path):
  """Pages of the other two benchmarks, from their metrics.json (no model run)."""
  from mirage_jax.evaluation import objects_benchmark, report  # pylint: disable=g-import-not-at-top
  e = lambda b, n, c: dict(backend=b, frames=n, cache_bytes=c, memory_seconds_per_chunk=0.01,
                           chunk_seconds=0.5)
  entries = [e("voxel", 64, 100), e("voxel", 1024, 100), e("mirage", 64, 80), e("mirage", 1024, 5000)]
  (tmp_path / "scaling").mkdir()
  report.write_metrics_json(tmp_path / "scaling" / "metrics.json", dict(benchmark="scaling", entries=entries))
  report.plot_cost_vs_length(tmp_path / "scaling" / "cost_vs_length.png", entries)
  text = open(index_html.write_index(str(tmp_path / "scaling"), command=["python", "x"])).read()
  assert text.count(">PASS<") == 2 and text.count(">FAIL<") == 0
  assert '<img class="plot" src="cost_vs_length.png"' in text and "<td>5000</td>" in text

  row = lambda ghost, obj, ident: dict({k: 1.0 for k in objects_benchmark.SCALARS}, ghost_psnr=ghost,
                                        object_psnr_reentry=obj, identity_consistency=ident)
  summary = dict(mirage=row(20.0, 15.0, 0.5), voxel=row(22.0, 15.0, 0.5),
                 **{"voxel+objects": row(22.0, 15.2, 0.9)},
                 **{c: 3 for c in objects_benchmark.COUNTS})
  out = tmp_path / "objects"
  (out / "videos" / "seed1").mkdir(parents=True)
  report.write_metrics_json(out / "metrics.json", dict(
      benchmark="objects", rows=["mirage", "voxel", "voxel+objects"], summary=summary,
      trajectories={"seed1": {}}))
  for name in ("voxel+objects", "ground_truth", "mirage"):
    (out / "videos" / "seed1" / f"{name}.mp4").write_bytes(b"x")
  text = open(index_html.write_index(str(out))).read()
  # Ghosts: PASS; slots: +0.2 dB object PSNR (FAIL, needs +0.5), +0.4 identity (PASS).
  assert re.findall(r">(PASS|FAIL)</span> ([^<]+)<", text) == [
      ("PASS", "objects: voxel ghost-region PSNR &gt;= mirage (no ghosts)"),
      ("FAIL", "objects: voxel+objects object_psnr_reentry &gt;= voxel + 0.5"),
      ("PASS", "objects: voxel+objects identity_consistency &gt;= voxel + 0.1")]
  # Ground truth first, then the rows in the benchmark's order.
  assert re.findall(r'<video src="([^"]+)"', text) == [
      "videos/seed1/ground_truth.mp4", "videos/seed1/mirage.mp4", "videos/seed1/voxel%2Bobjects.mp4"]
  assert oct(os.stat(out / "index.html").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_main_job_claims_and_summary_page(tmp_path, capsys):
  from mirage_jax import main_job  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  (tmp_path / "revisit").mkdir()
  (tmp_path / "scaling").mkdir()
  row = lambda p: dict(psnr_revisit=p, ssim_revisit=0.5, psnr_all=p)
  report.write_metrics_json(tmp_path / "revisit" / "metrics.json", dict(revisit=dict(summary=dict(
      none=row(10.0), mirage=row(16.0), reference={}, revisit_frames=4,
      voxel=dict(row(14.5), psnr_revisit_given=20.0, psnr_revisit_generated=14.0, revisit_loss=0.5),
      oracle=dict(row(17.0), psnr_revisit_given=20.5, psnr_revisit_generated=17.0,
                  revisit_loss=0.25)))))
  e = lambda b, n, c, s: dict(backend=b, frames=n, cache_bytes=c, memory_seconds_per_chunk=0.0,
                              chunk_seconds=s)
  report.write_scaling_json(tmp_path / "scaling" / "scaling.json",
                            [e("voxel", 64, 10, 1.0), e("voxel", 1024, 10, 1.1), e("mirage", 1024, 900, 2.0)])
  claims = main_job.print_claims(str(tmp_path))
  assert claims == {"voxel revisit PSNR >= none (memory off) + 4 dB": True,
                    "voxel revisit PSNR >= mirage - 1 dB": False,  # 1.5 dB below
                    "voxel cache >= 10x smaller than mirage at 1024 frames": True,
                    "voxel time per chunk at 1024 within 20% of 64 frames": True}
  out = capsys.readouterr().out
  assert "[FAIL] voxel revisit PSNR >= mirage - 1 dB" in out
  from mirage_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top
  assert out.count(lpips.NO_WEIGHTS) == 4  # the revisit table's rows: no LPIPS weights given
  assert ("oracle - voxel revisit PSNR: 2.50 dB; on revisits of the given frame 0.50 dB, of "
          "generated ones 3.00 dB, of which voxel's memory loses 0.25 dB") in out
  (tmp_path / "revisit" / "index.html").write_text("<html></html>")
  page = index_html.write_summary_index(str(tmp_path), claims,
                                        {"revisit": str(tmp_path / "revisit" / "index.html")})
  text = open(page).read()
  assert text.count(">PASS<") == 3 and text.count(">FAIL<") == 1
  assert '<a href="revisit/index.html">revisit</a>' in text
