"""Issue 12, acceptance 4: on the built-in workloads with known-irrelevant inputs, lumos keeps
every relevant input and drops every irrelevant one, on several seeds, at the ``small`` size
and with the settings ``lumos run`` / ``lumos bench`` use (target 20% of the parameters).

Feature selection is decided in the gated phase; the pipeline runs it as ``lumos run`` does
(:func:`lumos.pipeline.run_lumos`), without the fine-tuning that cannot change it.
"""
import pytest

from lumos import workloads
from lumos.pipeline import run_lumos

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # tiny models; see conftest

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["cfd_flux", "md_forces"])
def test_lumos_keeps_exactly_the_relevant_inputs(name, seed):
    work = workloads.load(name, "small", seed=seed)
    outcome = run_lumos(work, target=0.2, seed=seed, fine_tune_epochs=0, log=lambda *a: None)
    kept = outcome.report.kept_features
    lost = sorted(set(work.informative_features) - set(kept))
    extra = sorted(set(kept) - set(work.informative_features))
    assert not lost and not extra, f"{name} seed {seed}: lost {lost}, kept distractors {extra}"
