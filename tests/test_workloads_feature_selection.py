"""Issue 12, acceptance 4, and issue 10's "ends at the size asked for" on the built-in workloads:
on those with known-irrelevant inputs, lumos keeps every relevant input and drops every
irrelevant one, and every workload ends within 0.02 of its target, on several seeds, at the
``small`` size and with the settings ``lumos run`` / ``lumos bench`` use (target 20% of the
parameters).

Feature selection is decided in the gated phase; the pipeline runs it as ``lumos run`` does
(:func:`lumos.pipeline.run_lumos`), without the fine-tuning that cannot change it.
"""
import pytest

from lumos import kept_fraction, workloads
from lumos.pipeline import run_lumos

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # tiny models; see conftest

SEEDS = (0, 1, 2)
TARGET, TOLERANCE = 0.2, 0.02  # lumos run's target, and issue 10's tolerance


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["cfd_flux", "md_forces"])
def test_lumos_keeps_exactly_the_relevant_inputs(name, seed):
    work = workloads.load(name, "small", seed=seed)
    outcome = run_lumos(work, target=TARGET, seed=seed, fine_tune_epochs=0, log=lambda *a: None)
    kept = outcome.report.kept_features
    lost = sorted(set(work.informative_features) - set(kept))
    extra = sorted(set(kept) - set(work.informative_features))
    assert not lost and not extra, f"{name} seed {seed}: lost {lost}, kept distractors {extra}"
    assert abs(kept_fraction(outcome.gated) - TARGET) <= TOLERANCE


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["cosmo3d", "em_denoise", "molecules", "vit_fields"])
def test_lumos_ends_at_its_target_on_every_workload(name, seed):
    """The other workloads end at their target too (a U-Net's, a GINE's and a ViT's gates move
    together and fast at these sizes: BudgetController's look-ahead keeps them from overshooting
    below it). em_denoise's distractor is the closing note's open item, not asserted here."""
    work = workloads.load(name, "small", seed=seed)
    outcome = run_lumos(work, target=TARGET, seed=seed, fine_tune_epochs=0, log=lambda *a: None)
    assert abs(kept_fraction(outcome.gated) - TARGET) <= TOLERANCE
    assert set(work.informative_features or ()) <= set(outcome.report.kept_features or ())
