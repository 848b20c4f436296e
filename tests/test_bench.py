"""bench/bench_oms.py at tiny sizes on the CPU: every figure of the real run is produced and consistent."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lib_oms import text_encoders

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_oms(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    # the bench may swap the tokenizer: restore it
    monkeypatch.setattr(text_encoders, "encode_prompt", text_encoders.encode_prompt)
    sys.modules.pop("bench_oms", None)
    import bench_oms

    return bench_oms


def test_tiny_run_measures_every_path_side_by_side(bench_oms, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on the GPU machine, which has no open_clip
                        lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a))
    out = tmp_path / "bench.json"
    bench_oms.main(["--tiny", "--device", "cpu", "--base", "all", "--batches", "1,2", "--repeats", "1",
                    "--speed-options", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["tokenizer"].startswith("stand-in") and results["tokenize_one_prompt_ms"] is None
    rows = {(r["base"], r["batch"], r["cfg"], r["what"]): r for r in results["rows"]}
    for base in ("sd15", "sdxl"):
        for batch in (1, 2):
            step = rows[(base, batch, None, "base UNet, one CFG step")]["ms"]
            paths = [(None, "official-style eager step (anchor)")] + [
                (cfg, f"this project, {kind} prompt") for cfg in (1.0, 2.0) for kind in ("new", "cached")]
            for cfg, what in paths:
                row = rows[(base, batch, cfg, what)]
                assert row["ms"] > 0 and row["percent"] == pytest.approx(row["ms"] / (20 * step) * 100)
            for n in (batch, 2 * batch):
                assert rows[(base, batch, None, f"OMS network, eager, batch {n}")]["ms"] > 0
                assert rows[(base, batch, None, f"text encoder, transformers forward, {n} prompt(s)")]["ms"] > 0
    assert results["module_load_ms"] > 0 and results["peak_rss_mib"] > 0 and results["memory"] == {}
    assert set(results["speed_options"]) == {f"{label}, 16x16, batch {b}" for label in ("default", "channels-last")
                                             for b in (1, 2)}
    assert all(f["max_abs_vs_eager"] < 1e-4 for f in results["speed_options"].values())


def test_bad_batches_are_refused_before_any_work(bench_oms):
    with pytest.raises(SystemExit):
        bench_oms.main(["--tiny", "--device", "cpu", "--batches", "0"])
