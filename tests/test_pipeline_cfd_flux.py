"""The demo pipeline (``lumos demo``: cfd_flux at size ``demo``): budget hit, feature selection,
accuracy kept, exact compaction.

One run (dense 12 + 15 epochs, gated 24, fine-tune 3; 15-30 s of CPU time) serves every test.
"""
import json

import pytest
import torch

from lumos.pipeline import run_workload
from lumos.report import count_params
from lumos.workloads import load

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TARGET = 0.2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_workload("cfd_flux", size="demo", target=TARGET, out_dir=out, progress=False, latency_repeats=5,
                        log=lambda *a: None), out


def test_budget_controller_hits_target_params(result):
    res, _ = result
    kept = res.params["lumos"] / res.params["dense"]
    assert abs(kept - TARGET) <= 0.03, kept


def test_keeps_every_true_input_and_drops_every_distractor(result):
    res, _ = result
    work = load("cfd_flux", "small")
    assert sorted(res.report.kept_features) == sorted(work.informative_features)
    assert sorted(res.report.dropped_features) == sorted(work.distractor_features)


def test_fine_tuned_metric_within_one_percent_of_dense(result):
    res, _ = result
    assert res.metrics["fine_tuned"] >= res.metrics["dense"] * 0.99, res.metrics


def test_compacted_equals_gated_and_report_predicts_params(result):
    res, _ = result
    x = load("cfd_flux", "small").val[0][:512]
    compacted, gated = res.models["compacted"], res.models["gated"]
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=1e-5, rtol=1e-5)
    assert count_params(compacted) == res.report.params_after == count_params(res.models["fine_tuned"])


def test_writes_report_files(result):
    res, out = result
    data = json.loads((out / "report.json").read_text())
    assert data["params"]["lumos"] == res.params["lumos"]
    assert "rho_L" in (out / "report.md").read_text()
    for png in ("report.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(res.files) == sorted(str(out / f) for f in ("report.md", "report.json", "report.png", "training.png"))
