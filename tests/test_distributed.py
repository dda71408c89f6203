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
