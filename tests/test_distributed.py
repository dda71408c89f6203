"""DDP with 2 gloo processes on CPU: every rank draws the same gate masks and ends with the same
gates, so every rank compacts to the same small model (DESIGN section 6)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lumos

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # the same weights on every rank; gate masks come from lumos' own generator
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    x_all = torch.randn(256, 6)
    y_all = x_all[:, :2].sum(1, keepdim=True)
    gated = lumos.gate(model, x_all[:8])
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-2.0, 2.0)  # inside the band: the masks are random draws
    ddp = nn.parallel.DistributedDataParallel(gated)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.02)
    masks = []  # every mask every gate draws, in order
    for _, gate in lumos.gates_of(gated):
        gate.register_forward_hook(lambda module, args, mask: masks.append(mask.detach().clone()))
    torch.manual_seed(1000 + rank)  # torch's RNG now differs between ranks: the masks must not
    for step in range(30):
        x, y = x_all[rank::WORLD], y_all[rank::WORLD]  # each rank its own shard of the data
        loss = nn.functional.mse_loss(ddp(x), y) + 0.5 * lumos.penalty(gated, "params", normalize=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lumos.step_gates_(gated)  # clamp, and the next step's gate noise
    compacted = lumos.compact(gated)
    torch.save({"state": gated.state_dict(), "compacted": compacted.state_dict(), "masks": masks,
                "out": compacted(x_all).detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_on_gates_and_compacted_model(tmp_path):
    mp.spawn(_train, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert len(results[0]["masks"]) == len(results[1]["masks"]) > 30
    for a, b in zip(results[0]["masks"], results[1]["masks"]):
        assert torch.equal(a, b)
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key
    assert results[0]["compacted"].keys() == results[1]["compacted"].keys()
    for key, value in results[0]["compacted"].items():
        assert torch.equal(value, results[1]["compacted"][key]), key
    assert torch.equal(results[0]["out"], results[1]["out"])


# -- lumos.fit under torchrun --------------------------------------------------------------------

# The mean of the two ranks' losses (64 rows each) against one process's loss on the same 128 rows:
# the same float32 products summed in another order; measured up to 1.5e-7 relative.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """tests/fit_worker.py once in one process and once under torchrun with 2 gloo processes."""
    from fit_worker import launch

    folder = tmp_path_factory.mktemp("ddp")
    launch(folder / "one")
    launch(folder / "two", nproc=2)
    return folder, torch.load(folder / "one"), [torch.load(folder / f"two.rank{r}") for r in range(WORLD)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_ranks_draw_the_same_masks_and_compact_to_the_same_model(torchrun_runs):
    _, _, (rank0, rank1) = torchrun_runs
    assert len(rank0["masks"]) == len(rank1["masks"]) == 40 * 3  # 40 steps, 3 gates
    assert all(torch.equal(a, b) for a, b in zip(rank0["masks"], rank1["masks"]))
    assert _same(rank0["state"], rank1["state"])
    assert _same(rank0["compacted"], rank1["compacted"])
    assert torch.equal(rank0["compacted_out"], rank1["compacted_out"])
    assert rank0["history"] == [{**row, "seconds": a["seconds"]} for row, a in zip(rank1["history"], rank0["history"])]
    assert rank0["losses"] != rank1["losses"]  # each rank trained on its own half of every batch


@pytest.mark.slow
def test_torchrun_losses_equal_one_process_with_the_same_global_batch(torchrun_runs):
    _, one, (rank0, rank1) = torchrun_runs
    both = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    assert both[:10] == pytest.approx(one["losses"][:10], rel=LOSS_RTOL)
    assert rank0["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=LOSS_RTOL)
    assert rank0["history"][0]["val_loss"] == pytest.approx(one["history"][0]["val_loss"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_torchrun_run_killed_on_one_rank_resumes_on_both_from_the_checkpoint(torchrun_runs):
    """SIGKILL rank 1 after step 17 (torchrun then stops rank 0), run the same torchrun command
    again: both ranks resume after step 15 (rank 0 wrote the checkpoint) and end with exactly the
    weights of the uninterrupted 2-process run."""
    from fit_worker import launch

    folder, _, reference = torchrun_runs
    checkpoint = folder / "run.pt"
    killed = launch(folder / "resumed", "--checkpoint", checkpoint, "--every", 5, nproc=2, pause_at=17, kill_rank=1)
    assert "paused rank 1" in killed.stdout and not list(folder.glob("resumed*"))
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 15
    launch(folder / "resumed", "--checkpoint", checkpoint, "--every", 5, nproc=2)
    for rank in range(WORLD):
        resumed = torch.load(folder / f"resumed.rank{rank}")
        assert resumed["resumed_from"]["step"] == 15
        assert _same(resumed["state"], reference[rank]["state"])
        assert _same(resumed["compacted"], reference[rank]["compacted"])
    assert not list(folder.glob(".*"))  # no temporary file left


@pytest.mark.slow
def test_lumos_run_nproc_2_trains_data_parallel_and_reports_once(tmp_path):
    """The real command: `lumos run cfd_flux --nproc 2` relaunches itself under torchrun; both ranks
    train, checkpoint (rank 0 writes) and compact to the same model (run_workload checks it), and
    rank 0 alone writes the report."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "lumos", "run", "cfd_flux", "--nproc", "2", "--size", "small", "--epochs", "1",
               "--fine-tune-epochs", "1", "--no-progress", "--out", "report", "--checkpoint", "checkpoints"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "launching 2 processes" in done.stderr and "torch.distributed.run" in done.stderr
    assert done.stdout.count("[3/4] compacting") == 1 and done.stdout.count("written: report/report.md") == 1
    result = json.loads((tmp_path / "report" / "report.json").read_text())
    assert result["params"]["lumos"] < result["params"]["dense"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "dense.pt", "dense_more.pt", "fine_tune.pt", "gated.pt"]
    saved = torch.load(tmp_path / "checkpoints" / "gated.pt", weights_only=True)
    assert saved["settings"]["processes"] == 2 and saved["state"]["epoch"] == 2
