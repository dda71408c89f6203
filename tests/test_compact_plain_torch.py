"""A compacted model is plain PyTorch: its graph calls torch modules, torch functions and Python
operators only, it exports with torch.export, and ``torch.save(small)`` loads and runs in a
process where ``import lumos`` fails."""
import operator
import subprocess
import sys

import pytest
import torch

import lumos
from zoo import mlp_zoo, randomize_gates
from zoo_cnn import cnn_zoo
from zoo_graph_attention import GINEMolecule, TinyViT, make_images, make_molecules

LOADER = r"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lumos", "lumos_kernels"):
            raise ModuleNotFoundError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Blocked())
import torch
try:
    import lumos
    raise SystemExit("lumos is importable: the test proves nothing")
except ModuleNotFoundError:
    pass
for path in sys.argv[1:]:
    case = torch.load(path, weights_only=False)
    with torch.no_grad():
        out = case["model"](*case["inputs"])
    torch.testing.assert_close(out, case["expected"], atol=1e-5, rtol=1e-5)
    print("ok", case["name"])
"""


def _cases():
    """(name, gated model, example inputs, other inputs) for an MLP, a CNN with a closed layer, a
    Transformer and a GNN."""
    torch.manual_seed(0)
    cases = []
    model, x = mlp_zoo()["residual"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=1)
    cases.append(("mlp", gated, (x,), (torch.randn(3, 9),)))
    model, x, closed = cnn_zoo()["vgg"]
    gated = lumos.gate(model, x, feature_dim=1)
    randomize_gates(gated, seed=2, fully_closed=closed)
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha[0] = 4.0
    cases.append(("cnn", gated, (x,), (torch.randn(2, *x.shape[1:]),)))
    x = make_images(6)
    gated = lumos.gate(TinyViT().eval(), x)
    randomize_gates(gated, seed=3)
    cases.append(("transformer", gated, (x,), (make_images(3, seed=5),)))
    inputs = make_molecules(5)[:4]
    gated = lumos.gate(GINEMolecule().eval(), inputs)
    randomize_gates(gated, seed=4)
    cases.append(("gnn", gated, inputs, make_molecules(3, seed=9)[:4]))
    return cases


def _compact(gated, inputs):
    return lumos.compact(gated, inputs, allow_constant=True)  # a closed layer may cut the input off


def _torch_only(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the graph's callables that are not torch, operator or builtins."""
    foreign = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            module = getattr(node.target, "__module__", None) or ""
            if not (module.startswith("torch") or node.target in vars(operator).values()
                    or module == "builtins"):
                foreign.append(f"{module}.{getattr(node.target, '__name__', node.target)}")
        elif node.op == "call_module":
            module = type(gm.get_submodule(node.target))
            if not module.__module__.startswith("torch.nn"):
                foreign.append(f"{module.__module__}.{module.__name__}")
    for name, module in gm.named_modules():
        if not type(module).__module__.startswith(("torch.nn", "torch.fx")):
            foreign.append(f"{name}: {type(module).__module__}")
    return foreign


def test_compacted_models_load_and_run_without_lumos(tmp_path):
    paths = []
    for name, gated, inputs, other in _cases():
        compacted = _compact(gated, inputs)
        assert _torch_only(compacted) == [], name
        with torch.no_grad():
            expected = gated.eval()(*other)
        path = tmp_path / f"{name}.pt"
        torch.save({"name": name, "model": compacted, "inputs": other, "expected": expected}, path)
        paths.append(str(path))
    result = subprocess.run([sys.executable, "-c", LOADER, *paths], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["ok", "mlp", "ok", "cnn", "ok", "transformer", "ok", "gnn"]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["mlp", "cnn", "transformer"])
def test_compacted_models_export(index):
    name, gated, inputs, other = _cases()[index]
    compacted = _compact(gated, inputs)
    exported = torch.export.export(compacted, inputs)
    torch.testing.assert_close(exported.module()(*inputs), compacted(*inputs))


def test_zoo_compactions_hold_only_torch():
    from zoo_ops import OPS, make

    for name in OPS:
        model, x, _ = make(name)
        gated = lumos.gate(model, x, feature_dim=1 if x.dim() == 4 else -1)
        randomize_gates(gated, seed=2)
        assert _torch_only(_compact(gated, x)) == [], name
