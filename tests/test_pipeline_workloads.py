"""``lumos run`` end to end on every built-in workload at size ``small``: dense baseline, gated
training, exact compaction, fine-tuning, measurements and report files.

Small sizes train for seconds; these tests check that the pipeline is correct on every kind of
model (MLP, Conv3d + FC, U-Net, GINE, ViT), not the quality of a small run.
"""
import json
import math

import pytest
import torch

from lumos import workloads
from lumos.pipeline import batch_label, inference_inputs, run_workload, speed_text
from lumos.report import count_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; see conftest

ALL = workloads.available()
ATOL, RTOL = 1e-4, 1e-4  # float32, compacted vs gated eval


@pytest.fixture(scope="module", params=ALL)
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    result = run_workload(request.param, size="small", out_dir=out, progress=False, latency_repeats=3,
                          log=lambda *a: None)
    return request.param, result, out


def test_compacted_equals_gated_in_eval_and_report_predicts_its_size(run):
    name, result, _ = run
    work = workloads.load(name, "small")
    inputs = work.inputs("test", 24)  # not the inputs the model was traced with
    gated, compacted = result.models["gated"], result.models["compacted"]
    torch.testing.assert_close(compacted(*inputs), gated.eval()(*inputs), atol=ATOL, rtol=RTOL)
    assert count_params(compacted) == result.report.params_after == result.params["lumos"]
    assert result.metrics["gated"] == pytest.approx(result.metrics["compacted"], rel=1e-4, abs=1e-6)


def test_dense_model_unchanged_by_gating_and_fine_tuned_model_keeps_its_shape(run):
    name, result, _ = run
    inputs = workloads.load(name, "small").inputs("val", 7)
    fine, compacted = result.models["fine_tuned"], result.models["compacted"]
    assert fine is not compacted
    assert [p.shape for p in fine.parameters()] == [p.shape for p in compacted.parameters()]
    assert fine(*inputs).shape == result.models["dense"](*inputs).shape


def test_measurements_are_finite_and_state_how_they_were_taken(run):
    name, result, _ = run
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.params["lumos"] <= result.params["dense"]
    for model in ("dense", "fine_tuned"):
        inference = result.inference[model]
        assert inference["latency"]["median_ms"] > 0 and inference["latency"]["repeats"] == 3
        assert inference["memory"]["bytes"] > 4 * count_params(result.models[model])  # weights at least
        assert inference["memory"]["method"] == "cpu_profiler_allocations"
        energy = inference["energy"]
        assert (energy["joules"] is None) == energy["method"].startswith("unavailable")
    work = workloads.load(name, "small")
    assert result.batch == batch_label(work, inference_inputs(work))
    assert set(result.train_seconds) == {"dense", "dense_more", "gated", "fine_tune"}


def test_report_files_hold_the_run(run):
    name, result, out = run
    assert sorted(result.files) == sorted(str(out / f) for f in ("report.md", "report.json", "report.png",
                                                                  "training.png"))
    data = json.loads((out / "report.json").read_text())
    assert data["workload"] == name and data["size"] == "small"
    assert data["params"] == result.params
    assert len(data["history"]["gated"]) == 2 * workloads.load(name, "small").fit_defaults["epochs"]
    assert all("kept_fraction" in row for row in data["history"]["gated"])
    text = (out / "report.md").read_text()
    assert name in text and result.metric_name in text
    for png in ("report.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_graph_workload_refuses_fit_options_it_cannot_honour(tmp_path):
    with pytest.raises(ValueError, match=r"lumos\.evaluation\.train: workload 'molecules' .* cannot take precision"):
        run_workload("molecules", size="small", out_dir=tmp_path, progress=False, log=lambda *a: None,
                     fit_options={"precision": "bf16"})


def test_speed_text_says_slower_when_slower():
    assert speed_text(2.0, 1.0) == "2.00x faster"
    assert speed_text(1.0, 1.25) == "1.25x slower"


def test_a_classifier_learns_its_task_beyond_the_majority_class(run):
    # vit_fields' small ViT once stayed at the majority share and its gated model collapsed to a
    # constant; the dense and the final model must clearly beat always answering the commonest class
    name, result, _ = run
    if result.metric_name != "accuracy":
        pytest.skip(f"{name} is not a classifier")
    labels = workloads.load(name, "small").test[1]
    majority = float(torch.bincount(labels).max()) / len(labels)
    assert result.metrics["dense"] > majority + 0.2 and result.metrics["fine_tuned"] > majority + 0.2, \
        (result.metrics, majority)
