"""Router quality: held-out relative error of MoE FFNs against the dense FFN, per router and partition.

8 experts, 4 active, against `slice_neurons` to the same 50% width. Two models:
- `ClusteredFfn` (tests/passes/test_ffn_to_moe.py): tokens from 8 clusters, each firing its own 16 ReLU neurons;
- the built-in random-weight tiny Qwen2: error per FFN, on the hidden states entering each MLP.

    python bench/router_quality.py          # about a minute
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_inputs, make_model  # noqa: E402
from test_ffn_to_moe import ClusteredFfn, _rel_error  # noqa: E402

import sparsec  # noqa: E402
from sparsec import testing  # noqa: E402
from sparsec.data.calibration import CalibrationSet  # noqa: E402

ROUTERS = ("regression", "learned", "similarity", "random")
PARTITIONS = ("balanced", "kmeans", "coactivation")


def clustered() -> None:
    model = ClusteredFfn().eval()
    calib = CalibrationSet(model.tokens(32, 16, seed=1), source="clustered tokens")
    held_out = model.tokens(8, 16, seed=2)
    print("ClusteredFFN, held-out relative error")
    for partition in PARTITIONS:
        errors = {}
        for router in ROUTERS:
            program = sparsec.capture(model, model.tokens(2, 8, seed=0))
            testing.apply_pass(
                program,
                "ffn_to_moe",
                experts=8,
                top_k=4,
                shared=0,
                partition=partition,
                router=router,
                calibration=calib,
            )
            errors[router] = round(_rel_error(program, model, held_out), 3)
        print(f"  {partition:12s} {errors}")
    program = sparsec.capture(model, model.tokens(2, 8, seed=0))
    testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=calib)
    print(f"  static slice 50%: {_rel_error(program, model, held_out):.3f}")


def tiny_qwen2() -> None:
    model = make_model("tiny-qwen2")
    calib = CalibrationSet(make_inputs(model, 64, 32, seed=1), source="synthetic tokens")
    held = make_inputs(model, 16, 32, seed=7)
    seen = {}
    hooks = [
        layer.mlp.register_forward_hook(
            lambda _m, args, out, i=i: seen.__setitem__(
                i, (args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1]))
            )
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(**held)
    for h in hooks:
        h.remove()

    def error(got, i):
        want = seen[i][1]
        return round(float((got - want).norm() / want.norm()), 3)

    print("tiny Qwen2 (random weights), held-out relative error per FFN")
    for partition in PARTITIONS:
        for router in ROUTERS:
            program = sparsec.capture(model, make_inputs(model, 2, 16))
            testing.apply_pass(
                program,
                "ffn_to_moe",
                experts=8,
                top_k=4,
                shared=0,
                router=router,
                partition=partition,
                calibration=calib,
            )
            errors = []
            for i, node in enumerate(
                program.graph.find_nodes(op="call_function", target=torch.ops.sparsec.moe.default)
            ):
                args = [
                    program.state_tensor(program.state_name(a)) if isinstance(a, torch.fx.Node) else a
                    for a in node.args[1:]
                ]
                with torch.no_grad():
                    errors.append(error(torch.ops.sparsec.moe(seen[i][0], *args), i))
            print(f"  {partition:12s} {router:10s} {errors}")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=calib)
    errors = []
    for i, d in enumerate(record.decisions["ffns"]):
        mlp, kept = model.model.layers[i].mlp, torch.tensor(d["kept_indices"])
        x = seen[i][0]
        with torch.no_grad():
            h = torch.nn.functional.silu(x @ mlp.gate_proj.weight[kept].T) * (x @ mlp.up_proj.weight[kept].T)
            errors.append(error(h @ mlp.down_proj.weight[:, kept].T, i))
    print(f"  static slice 50%: {errors}")


if __name__ == "__main__":
    clustered()
    tiny_qwen2()
