"""The benchmark runs end to end and reports every section (it measures; it never asserts a
speed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_prints_and_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "eval.bench", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for section in ("== 1. training step", "== 3. evaluation"):
        assert section in p.stdout
    result = json.loads(out.read_text())
    assert result["train"] and all(r["img_per_s"] > 0 for r in result["train"])
    # the --compile row trains the same model from the same start as the eager fp32 row: the same
    # loss
    rows = {r["mode"]: r for r in result["train"]}
    assert rows["fp32+compile"]["loss"] == pytest.approx(rows["fp32"]["loss"], rel=1e-4)
    assert result["eval"] and result["eval"][0]["img_per_s"] > 0


@pytest.mark.parametrize("lambda_p", [0, 1])
def test_bench_icon_times_icons_train_step(lambda_p):
    # the ICON section (off under --quick) times icon.train_step itself, baseline and contrast
    from eval.bench import icon_config
    row = icon_config(dict(backbone="resnet18", lambda_p=lambda_p, flags=[], device="cpu",
                           threads=1, iters=1, warmup=0))
    assert row["model"] == "resnet18" + (" + ICON" if lambda_p else "")
    assert row["img_per_s"] > 0 and row["ms_per_iter"] > 0
