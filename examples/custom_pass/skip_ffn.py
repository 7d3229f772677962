"""An example custom pass: what a user writes to add a rewrite to sparsec.

`SkipFfn` removes the FFNs matching a glob from the residual stream (`h + ffn(x)` becomes `h`). It shows the
three parts of a pass: `requires` (check the pattern first, touch nothing otherwise, and return what it
found: the plan the manager hands to `run`), `run` (an in-place graph edit following the plan; the manager
then prunes the now-dead FFN and its weights, verifies the program and checks quality on calibration data)
and `ensures` (the pass's own postcondition, checked by the manager).

Use it from Python with `register_pass(SkipFfn)`, or install this directory as a package
(`pip install examples/custom_pass`): its `pyproject.toml` registers the pass under the `sparsec.passes`
entry-point group, so `sparsec passes` lists it and recipes name it. `test_skip_ffn.py` is its unit test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsec.analysis.regions import region_index
from sparsec.errors import PassError
from sparsec.transform.pass_manager import Pass, PassResult

aten = torch.ops.aten


class SkipFfn(Pass):
    """Remove FFNs from the residual stream: `h + ffn(x)` -> `h`."""

    name = "skip_ffn"

    @dataclass
    class Options:
        where: str = "**"

        def __post_init__(self):
            if not self.where:
                raise ValueError("where: must be a non-empty module-path glob")

    def _residual_adds(self, program):
        ffns = region_index(program).ffns(self.options.where)
        if not ffns:
            raise PassError(f"skip_ffn: no FFN matches where={self.options.where!r}")
        adds = []
        for ffn in ffns:
            users = list(ffn.down.users)
            if len(users) != 1 or users[0].target is not aten.add.Tensor:
                raise PassError(f"skip_ffn: the output of {ffn.path} is not added to a residual stream")
            adds.append((ffn, users[0]))
        return adds

    def requires(self, program, ctx):
        return self._residual_adds(program)  # the plan: the manager hands it to run()

    def run(self, program, ctx, plan):
        skipped = []
        for ffn, add in plan:
            residual = add.args[0] if add.args[1] is ffn.down else add.args[1]
            add.replace_all_uses_with(residual)
            program.graph.erase_node(add)
            skipped.append(ffn.path)
        return PassResult(modified=True, stats={"skipped": len(skipped)}, decisions={"skipped": skipped})

    def ensures(self, program, ctx, result):
        left = [
            p
            for p in result.decisions["skipped"]
            if p in region_index(program) and region_index(program).region(p).nodes
        ]
        if left:
            raise PassError(f"skip_ffn: nodes of {left} are still in the graph")
