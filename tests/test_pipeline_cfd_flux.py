"""The demo pipeline on cfd_flux: budget hit, feature selection, accuracy kept, exact compaction.

One training run (dense 20 + gated 40 epochs, about a minute on 2 cores) serves every test.
"""
import json

import pytest
import torch

from lumos.pipeline import run_workload
from lumos.report import count_params
from lumos.workloads import load

pytestmark = pytest.mark.slow
TARGET = 0.2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_workload("cfd_flux", target=TARGET, out_dir=out, progress=False, latency_repeats=5,
                        log=lambda *a: None), out


def test_budget_controller_hits_target_params(result):
    res, _ = result
    kept = res.params_compacted / res.params_dense
    assert abs(kept - TARGET) <= 0.03, kept


def test_keeps_every_true_input_and_drops_every_distractor(result):
    res, _ = result
    work = load("cfd_flux")
    assert sorted(res.report.kept_features) == sorted(work.informative_features)
    assert sorted(res.report.dropped_features) == sorted(work.distractor_features)


def test_compacted_metric_within_one_percent_of_dense(result):
    res, _ = result
    assert res.metric_compacted >= res.metric_dense * 0.99, (res.metric_dense, res.metric_compacted)


def test_compacted_equals_gated_and_report_predicts_params(result):
    res, _ = result
    x = load("cfd_flux").val[0][:512]
    compacted, gated = res.models["compacted"], res.models["gated"]
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=1e-5, rtol=1e-5)
    assert count_params(compacted) == res.report.params_after


def test_writes_report_files(result):
    res, out = result
    data = json.loads((out / "report.json").read_text())
    assert data["params"]["compacted"] == res.params_compacted
    assert "rho_L" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
