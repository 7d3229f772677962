"""`ffn_to_moe`: turn dense FFNs into mixtures of experts made of their own neurons, with a fitted router.

The defaults (16 experts, 4 active, a shared expert of the top third of the neurons: half the FFN neurons active
per token; `coactivation` partition; `regression` router) are what held-out perplexity on a real pretrained LLM
chose, before any training: there, an MoE without a shared expert loses to a static slice of the same active
width even when each token gets the experts of largest true activation mass (every expert holds some of the
few neurons every token needs), and a shared expert of the most important neurons plus routed experts clustered
by co-activation beats the slice (bench/moe_search.py).

For each matched FFN (gated, fused gated or plain; see `sparsec.analysis.ffn`):

1. **Partition.** An always-on shared expert takes the `shared` fraction of most important neurons
   (`sparsec.analysis.importance`; default a third, 0 for none). The other neurons are split into `experts` equal
   experts:
   - `balanced`: neurons sorted by importance are dealt to experts in snake order (0..E-1, E-1..0, ...),
     so every expert gets a fair share of important neurons;
   - `kmeans`: balanced k-means on the neurons' input weight vectors (gate and up rows; MoEfication);
   - `coactivation` (default): neurons whose activation magnitudes rise and fall together over the calibration
     tokens go together (CMoE, MoEfication; balanced k-means on each neuron's standardized activation profile,
     which groups the strongly connected neurons of the co-activation graph).
   Remainder rule: when the non-shared width is not a multiple of `experts`, the `width mod experts` most
   important leftover neurons join the shared expert, so experts stay equal and the MoE stays exact.
2. **Router** (linear, hidden -> E, with bias), fit on calibration hidden states to pick, per token, the experts
   whose outputs are largest: `regression` (default) predicts each expert's output norm by least squares
   (closed form, `regression_router`); `learned` is MoEfication's recipe (binary cross-entropy against each
   token's top-k experts by output norm, on standardized inputs, `fit_steps` Adam steps); `similarity` uses each
   expert's mean input weight vector (no data); `random` is a seeded baseline; `zero` is the paper's
   initialisation (weights zero, no bias). A zero router ties every logit: the k lowest-index experts serve
   every token (`sparsec.ops.moe`) until `adapt` trains it, as the paper does (it fine-tunes the zero-initialised
   router, with or without the experts).
3. **Rewrite.** The FFN becomes one `torch.ops.sparsec.moe` node (routing semantics in `sparsec.ops.moe`:
   `gating` unit|softmax|renormalized over a softmax, or the paper's one_plus_logit) plus, if there is a shared
   expert, the dense FFN sliced to the shared neurons. Under `one_plus_logit` the shared expert is gated as in the
   paper, `shared(x) * (1 + gate_shared(x))` with `gate_shared` a bias-free Linear(H, 1) initialised to zero
   (`<ffn>.moe.shared_gate_weight`, plain ATen ops in the graph; a dense down bias is part of `shared(x)`). So
   `gating: one_plus_logit, router: zero` is exactly the paper's conversion: the sum of k experts plus the shared
   expert. Under the default `gating: unit`, `top_k == experts` computes exactly the
   dense FFN; with calibration data the pass checks that on sampled tokens before it rewrites anything.
   Under `one_plus_logit` the logits are the expert weights' offsets from 1: a fitted router's logits (fit for
   ranking) rescale the experts, so start from `zero` and `adapt`.
4. **Adapt** (optional): the recovery training of the `distill` pass (`sparsec.data.distill.train_end_to_end`)
   run inside this pass on the parameters it adds: `router` tunes the routers (and shared gates) end to end against
   the dense program (`PassContext.reference`, the program before the recipe's first pass) with the experts frozen;
   `full` tunes routers and experts. Loss: KL of the logits (relative squared error of other outputs) plus
   `balance` times the Switch load-balancing term (E * sum_e f_e * P_e) per MoE node, read off the MoE nodes' inputs
   as extra graph outputs. Adam, `adapt_steps` steps at constant `lr`, deterministic. `ffn_to_moe` with `adapt`
   equals `ffn_to_moe` followed by `distill: {trainable: ["**.moe.router_*", "**.moe.shared_gate_weight"], lr: 1e-3,
   schedule: constant, warmup: 0}` (with `full`, `["**.moe.*"]`) but for the balance term, which only this pass knows how to read; so
   `adapt` stays, a thin use of the same training.

Recipe:
    passes:
      - ffn_to_moe: {where: "model.layers.*.mlp"}   # 16 experts, 4 active, a third shared: half active
      - ffn_to_moe: {experts: 16, top_k: 8, shared: 0, partition: balanced, gating: one_plus_logit, router: zero,
                     adapt: router}  # the paper's
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.fx import Node

from sparsec.analysis.dependency import ChannelGroup, ffn_channel_group, linear_weight
from sparsec.analysis.ffn import Ffn, ffn_activation
from sparsec.analysis.importance import Importance, neuron_importance
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import region_index
from sparsec.data.distill import AuxiliaryLoss, TrainingReport, TrainingSettings, train_end_to_end
from sparsec.errors import PassError
from sparsec.ir.program import Program
from sparsec.ops.moe import Gating, moe_dense_reference, route, router_logits
from sparsec.progress import progress_bar
from sparsec.transform.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten
MOE = torch.ops.sparsec.moe.default
# relative L2 error allowed between the k = E MoE (recomputed in float32) and the FFN's observed outputs
EXACTNESS_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}
ROUTING_STATE = ("router_weight", "router_bias", "shared_gate_weight")  # what `adapt: router` trains


@dataclass
class ExpertWeights:
    """An FFN's neurons in the MoE operator's layout (rows of gate/up, columns of down), any subset."""

    fc1: torch.Tensor  # [I, H]: gate rows (gated) or fc1 rows (plain)
    fc1_bias: torch.Tensor | None
    fc3: torch.Tensor | None  # [I, H]: up rows (gated only)
    fc3_bias: torch.Tensor | None
    fc2: torch.Tensor  # [H, I]: down columns

    @classmethod
    def of(cls, program: Program, ffn: Ffn) -> ExpertWeights:
        def rows(linear: Node, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            offset, size = ffn.row_blocks(role)
            weight = linear_weight(program, linear).narrow(0, offset, size)
            bias_node = linear.args[2] if len(linear.args) > 2 else None
            bias = (
                program.state_tensor(program.state_name(bias_node)).narrow(0, offset, size)
                if bias_node is not None
                else None
            )
            return weight, bias

        down = linear_weight(program, ffn.down)
        if ffn.kind == "plain":
            return cls(*rows(ffn.up, "up"), None, None, down)
        gate, gate_bias = rows(ffn.gate if ffn.gate is not None else ffn.up, "gate")
        return cls(gate, gate_bias, *rows(ffn.up, "up"), down)

    def stacked(self, experts: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Per-expert neuron indices -> the op's stacked tensors (`fc1_weight` [E, I_e, H], ...)."""
        index = torch.stack(experts)  # [E, I_e]

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index].contiguous()

        return {
            "fc1_weight": pick(self.fc1),
            "fc1_bias": pick(self.fc1_bias),
            "fc3_weight": pick(self.fc3),
            "fc3_bias": pick(self.fc3_bias),
            "fc2_weight": self.fc2[:, index].permute(1, 0, 2).contiguous(),
        }


def _snake_deal(order: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Neurons in `order` (most important first) dealt 0..E-1, E-1..0, ...; each expert's list sorted."""
    rank = torch.arange(len(order))
    turn, position = rank // num_experts, rank % num_experts
    expert = torch.where(turn % 2 == 0, position, num_experts - 1 - position)
    return [order[expert == e].sort().values for e in range(num_experts)]


def _balanced_assign(distance: torch.Tensor, size: int) -> torch.Tensor:
    """Assign N points to E clusters of exactly `size` each, greedily by increasing distance."""
    n, e = distance.shape
    labels = [-1] * n
    room = [size] * e
    left = n
    for flat in distance.flatten().argsort().tolist():
        point, cluster = divmod(flat, e)
        if labels[point] < 0 and room[cluster]:
            labels[point] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def _balanced_kmeans(features: torch.Tensor, num_experts: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """Labels [N] of a k-means clustering into `num_experts` clusters of equal size (cosine geometry)."""
    points = F.normalize(features.float(), dim=1)
    size = len(points) // num_experts
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=gen)[:num_experts]]
    labels = None
    for _ in range(iterations):
        new = _balanced_assign(torch.cdist(points, centroids), size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = F.normalize(torch.stack([points[labels == c].mean(0) for c in range(num_experts)]), dim=1)
    return labels


@dataclass(frozen=True, kw_only=True)
class FfnDecision:
    """One FFN made a MoE: its widths and experts, the exactness on calibration tokens (relative L2 error of the
    MoE with every expert active against the dense FFN; None without data), the router's fit, the shared gate's
    tensor (None without one) and the neurons of the shared part and of each expert (dense indices)."""

    path: str
    kind: str
    activation: str
    width: int
    experts: int
    expert_size: int
    top_k: int
    shared_neurons: int
    active_neurons_per_token: int
    active_fraction: float
    parameters_before: int
    parameters_after: int
    exactness_rel_l2: float | None
    router: dict[str, Any]
    shared_gate: str | None
    shared_indices: list[int]
    expert_indices: list[list[int]]


@dataclass(frozen=True, kw_only=True)
class MoeDecisions:
    """What `ffn_to_moe` chose (decisions.json holds these fields): partition and gating, the adaptation's
    training report (None without `adapt`) and each FFN's decision."""

    partition: str
    gating: str
    adapt: TrainingReport | None
    ffns: list[FfnDecision]


@dataclass(frozen=True)
class FfnPlan:
    """One matched FFN: its channel group, activation and the width of its shared expert (0: none)."""

    ffn: Ffn
    group: ChannelGroup
    activation: str
    shared: int


class FfnToMoe(Pass):
    """Replace dense FFNs by MoE FFNs of their own neurons (`torch.ops.sparsec.moe`), routed by a learned router."""

    name = "ffn_to_moe"

    @dataclass
    class Options:
        experts: int = 16
        top_k: int = 4
        shared: float = 1 / 3
        partition: Literal["balanced", "kmeans", "coactivation"] = "coactivation"
        router: Literal["regression", "learned", "similarity", "random", "zero"] = "regression"
        gating: Gating = "unit"
        importance: Importance = "activation"
        where: str = "**"
        adapt: Literal["none", "router", "full"] = "none"
        adapt_steps: int = 100
        lr: float = 1e-3
        balance: float = 0.01
        fit_steps: int = 300
        max_tokens: int = 8192
        seed: int = 0

        def __post_init__(self) -> None:
            if self.experts < 2:
                raise ValueError(f"experts: must be >= 2, got {self.experts}")
            if not 1 <= self.top_k <= self.experts:
                raise ValueError(f"top_k: must be in [1, experts={self.experts}], got {self.top_k}")
            if not 0 <= self.shared < 1:
                raise ValueError(f"shared: a fraction of the neurons in [0, 1), got {self.shared}")
            for name in ("adapt_steps", "fit_steps", "max_tokens"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
            if self.lr <= 0 or self.balance < 0:
                raise ValueError("lr must be > 0 and balance >= 0")

    # ----- analysis ---------------------------------------------------------------------------------------
    def _needs_data(self) -> bool:
        o = self.options
        return (
            o.importance == "activation"
            or o.partition == "coactivation"
            or o.router in ("learned", "regression")
            or o.adapt != "none"
        )

    def _plan(self, program: Program) -> list[FfnPlan]:
        """One `FfnPlan` per matched FFN; PassError before any change."""
        o = self.options
        ffns = region_index(program).require_ffns(o.where, self.name)
        plan = []
        for ffn in ffns:
            group = ffn_channel_group(program, ffn)
            activation = ffn_activation(ffn)
            if isinstance(activation, NoMatch):
                raise PassError(f"ffn_to_moe: FFN {ffn.describe()}: {activation.rule}")
            if ffn.gate is not None and ffn.gate.args[0] is not ffn.up.args[0]:
                raise PassError(
                    f"ffn_to_moe: FFN {ffn.describe()}: gate and up read different values; "
                    "one MoE node cannot take both"
                )
            width = ffn.intermediate_size
            shared = round(o.shared * width)
            shared += (width - shared) % o.experts
            if width - shared < o.experts:
                raise PassError(
                    f"ffn_to_moe: FFN {ffn.describe()} has {width} neurons, too few for {o.experts} experts "
                    f"after {shared} shared; use fewer experts"
                )
            plan.append(FfnPlan(ffn, group, activation, shared))
        return plan

    def targets(self, program: Program) -> list[str]:
        return [f.path for f in region_index(program).ffns(self.options.where)]

    def requires(self, program: Program, ctx: PassContext) -> list[FfnPlan]:
        """The plan: per matched FFN, its channel group, activation and shared width (see `_plan`)."""
        plan = self._plan(program)
        if self._needs_data():
            calibration = ctx.require_calibration(self.name)
            if calibration.num_tokens() == 0:
                raise PassError(
                    f"ffn_to_moe: the calibration set {calibration.source} has zero valid tokens "
                    "(attention_mask is all zeros); the router and importance need real tokens"
                )
        return plan

    def _partition(
        self,
        weights: ExpertWeights,
        activation: str,
        score: torch.Tensor,
        shared: int,
        inputs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        o = self.options
        order = score.argsort(descending=True, stable=True)
        shared_idx, rest = order[:shared].sort().values, order[shared:]
        if o.partition == "balanced":
            return shared_idx, _snake_deal(rest, o.experts)
        if o.partition == "kmeans":
            rows = [weights.fc1] + ([weights.fc3] if weights.fc3 is not None else [])
            features = torch.cat([F.normalize(r.float(), dim=1) for r in rows], dim=1)[rest]
        else:
            single = _float(weights.stacked([torch.arange(weights.fc1.shape[0])]))
            h = moe_dense_reference(inputs[:4096].float(), *single.values(), activation, hidden=True)
            profile = h.squeeze(-2).abs()[:, rest]
            features = ((profile - profile.mean(0)) / profile.std(0).clamp_min(1e-12)).T
        labels = _balanced_kmeans(features, o.experts, o.seed)
        return shared_idx, [rest[labels == e].sort().values for e in range(o.experts)]

    def _router(
        self, experts: dict, activation: str, inputs: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        o = self.options
        num, hidden = experts["fc1_weight"].shape[0], experts["fc1_weight"].shape[2]
        device = experts["fc1_weight"].device  # the router lives beside its experts
        if o.router == "zero":
            return torch.zeros(num, hidden, device=device), None, {}
        if o.router == "random":
            weight = torch.randn(num, hidden, generator=generator) / math.sqrt(hidden)  # seeded on the CPU
            return weight.to(device), torch.zeros(num, device=device), {}
        if o.router == "similarity":
            return F.normalize(experts["fc1_weight"].float().mean(1), dim=1), torch.zeros(num, device=device), {}
        if o.router == "regression":
            x = inputs.float()
            return regression_router(expert_output_norms(experts, activation, x), x)
        return self._fit_router(experts, activation, inputs)

    def _fit_router(
        self, experts: dict, activation: str, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """MoEfication: predict each token's top-k experts by output norm (BCE), on standardized inputs."""
        o = self.options
        x = inputs.float()
        mass = expert_output_norms(experts, activation, x)
        target = torch.zeros_like(mass).scatter_(1, mass.topk(o.top_k, dim=1).indices, 1.0)
        held_out = max(1, len(x) // 10) if len(x) >= 20 else 0
        train_x, train_t = x[: len(x) - held_out], target[: len(x) - held_out]
        mean = train_x.mean(0)
        std = train_x.std(0).clamp_min(1e-6) if len(train_x) > 1 else torch.ones(x.shape[1], device=x.device)
        weight = torch.zeros(mass.shape[1], x.shape[1], device=x.device, requires_grad=True)
        bias = torch.zeros(mass.shape[1], device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
        z = (train_x - mean) / std
        with torch.enable_grad():
            for _ in range(o.fit_steps):
                loss = F.binary_cross_entropy_with_logits(F.linear(z, weight, bias), train_t)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        weight, bias = weight.detach() / std, bias.detach() - (weight.detach() / std) @ mean  # fold the standardization
        report = {"fit_loss": float(loss), "tokens": len(train_x)}
        if held_out:
            picked = router_logits(x[-held_out:], weight, bias).topk(o.top_k, dim=1).indices
            hits = torch.zeros_like(target[-held_out:]).scatter_(1, picked, 1.0) * target[-held_out:]
            report["held_out_recall"] = float(hits.sum() / target[-held_out:].sum())
        return weight, bias, report

    def needs_reference(self) -> bool:
        return self.options.adapt != "none"

    # ----- rewrite ------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext, plan: list[FfnPlan]) -> PassResult:
        o = self.options
        ffns = [p.ffn for p in plan]
        scores = neuron_importance(program, ffns, o.importance, ctx.statistics, o.seed)
        samples: dict[str, torch.Tensor] = {}
        if ctx.calibration is not None:
            samples = ctx.statistics.samples([n for f in ffns for n in (f.up.args[0], f.down)], o.max_tokens)
        generator = torch.Generator().manual_seed(o.seed)
        decisions, trainable, routers = [], [], []
        for p, score in progress_bar(
            list(zip(plan, scores)), desc="ffn_to_moe: experts and routers", enabled=ctx.progress
        ):
            ffn, group, activation, shared = p.ffn, p.group, p.activation, p.shared
            weights = ExpertWeights.of(program, ffn)
            inputs = samples.get(ffn.up.args[0].name)
            shared_idx, experts = self._partition(weights, activation, score, shared, inputs)
            stacked = weights.stacked(experts)
            router_weight, router_bias, fit = self._router(stacked, activation, inputs, generator)
            error = None
            if inputs is not None:
                error = self._exactness(
                    program, ffn, weights, shared_idx, stacked, activation, inputs, samples[ffn.down.name]
                )
            before = group.num_parameters(program)
            names = rewrite_as_moe(
                program,
                ffn,
                group,
                shared_idx,
                stacked,
                router_weight.to(weights.fc1.dtype),
                None if router_bias is None else router_bias.to(weights.fc1.dtype),
                activation,
                o.top_k,
                o.gating,
            )
            trainable += [n for k, n in names.items() if k in ROUTING_STATE or o.adapt == "full"]
            routers.append(names)
            after = sum(program.state_tensor(n).numel() for n in names.values()) + (
                group.num_parameters(program) if shared else 0
            )
            width = ffn.intermediate_size
            decisions.append(
                FfnDecision(
                    path=ffn.path,
                    kind=ffn.kind,
                    activation=activation,
                    width=width,
                    experts=o.experts,
                    expert_size=len(experts[0]),
                    top_k=o.top_k,
                    shared_neurons=int(shared),
                    active_neurons_per_token=int(shared + o.top_k * len(experts[0])),
                    active_fraction=(shared + o.top_k * len(experts[0])) / width,
                    parameters_before=before,
                    parameters_after=after,
                    exactness_rel_l2=error,
                    router={"kind": o.router, **fit},
                    shared_gate=names.get("shared_gate_weight"),
                    shared_indices=shared_idx.tolist(),
                    expert_indices=[e.tolist() for e in experts],
                )
            )
        adaptation = None
        if o.adapt != "none":
            program.recompile()
            program.prune()
            if ctx.reference is None:
                raise PassError("ffn_to_moe: adapt needs the dense reference program; run it through the PassManager")
            adaptation = train_end_to_end(
                program,
                ctx.reference,
                trainable,
                ctx.calibration,
                TrainingSettings(steps=o.adapt_steps, lr=o.lr, schedule="constant", seed=o.seed),
                auxiliary=self._balance_loss(program, routers) if o.balance else None,
                progress=ctx.progress,
                description=f"ffn_to_moe adapt ({o.adapt})",
            )
        stats = {
            "ffns": len(decisions),
            "experts": o.experts,
            "top_k": o.top_k,
            "active_fraction": sum(d.active_neurons_per_token for d in decisions) / sum(d.width for d in decisions),
        }
        return PassResult(
            modified=True,
            stats=stats,
            decisions=MoeDecisions(partition=o.partition, gating=o.gating, adapt=adaptation, ffns=decisions),
        )

    def _balance_loss(self, program: Program, routers: list[dict[str, str]]) -> AuxiliaryLoss:
        """The Switch load-balancing term E * sum_e f_e * P_e summed over the MoE nodes whose state names by role are
        `routers`, scaled by `balance`: their inputs are extra graph outputs, their routers the trained tensors."""
        by_router = {n.args[1].name: n for n in program.graph.find_nodes(op="call_function", target=MOE)}
        placeholders = program.state_placeholders()
        nodes = [by_router[placeholders[names["router_weight"]].name] for names in routers]

        def compute(inputs: list[torch.Tensor], state) -> torch.Tensor:
            total = []
            for x, node, names in zip(inputs, nodes, routers):
                bias = state(names["router_bias"]) if "router_bias" in names else None
                logits = router_logits(x.reshape(-1, x.shape[-1]), state(names["router_weight"]), bias)
                probs = torch.softmax(logits, dim=-1)
                top_k, gating = node.args[8], node.args[10]
                _, chosen = route(logits, top_k, gating)  # the experts the op picks (one_plus_logit: its own ties)
                fraction = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / top_k
                total.append(probs.shape[-1] * (fraction * probs.mean(0)).sum())
            return self.options.balance * torch.stack(total).sum()

        return AuxiliaryLoss([n.args[0].name for n in nodes], compute)

    def _exactness(
        self,
        program: Program,
        ffn: Ffn,
        weights: ExpertWeights,
        shared_idx: torch.Tensor,
        stacked: dict,
        activation: str,
        inputs: torch.Tensor,
        dense: torch.Tensor,
    ) -> float:
        """Relative L2 error of all experts + shared part + down bias against the FFN's observed outputs."""
        x = inputs[:2048].float()
        y = moe_dense_reference(x, *_float(stacked).values(), activation).sum(-2)
        if len(shared_idx):
            y = y + moe_dense_reference(x, *_float(weights.stacked([shared_idx])).values(), activation).squeeze(-2)
        bias = ffn.down.args[2] if len(ffn.down.args) > 2 else None
        if bias is not None:
            y = y + program.state_tensor(program.state_name(bias)).float()
        want = dense[: len(x)].float()
        error = float((y - want).norm() / want.norm().clamp_min(1e-12))
        if error > EXACTNESS_TOLERANCE.get(dense.dtype, 3e-2):
            raise PassError(
                f"ffn_to_moe: FFN {ffn.describe()}: its experts do not reproduce the dense FFN on calibration tokens "
                f"(relative error {error:.2e} with every expert on); the FFN computes something the MoE "
                "operator does not model, so it is left alone"
            )
        return error

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        found = moe_nodes(program)
        for decision in result.decisions.ffns:
            node = found.get(decision.path)
            if node is None:
                raise PassError(f"ffn_to_moe: no MoE node at {decision.path} after the rewrite")
            experts, width = node.args[3].meta["val"].shape[:2]
            if (experts, width, node.args[8]) != (decision.experts, decision.expert_size, decision.top_k):
                raise PassError(f"ffn_to_moe: the MoE node at {decision.path} is not what the report says")


def expert_output_norms(experts: dict, activation: str, x: torch.Tensor) -> torch.Tensor:
    """[T, E]: the norm of each expert's output ||expert_e(x_t)|| on the tokens `x` [T, H] (float32)."""
    stacked = _float(experts)
    return torch.cat(
        [
            moe_dense_reference(
                chunk,
                stacked["fc1_weight"],
                stacked["fc1_bias"],
                stacked["fc3_weight"],
                stacked["fc3_bias"],
                stacked["fc2_weight"],
                activation,
            ).norm(dim=-1)
            for chunk in x.split(1024)
        ]
    )


def regression_router(
    norms: torch.Tensor, x: torch.Tensor, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The linear router (weight [E, H], bias [E]) whose logits are the least-squares prediction of each expert's
    output norm `norms` [T, E] from the tokens `x` [T, H]: a closed-form solve on centred inputs with a ridge of
    `ridge` times the mean input variance, so the top-k logits pick the experts expected to contribute most."""
    mean_x, mean_n = x.mean(0), norms.mean(0)
    xc = (x - mean_x).double()
    gram = xc.T @ xc
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-12)
    weight = torch.linalg.solve(gram, xc.T @ (norms - mean_n).double()).T.float()
    bias = mean_n - weight @ mean_x
    fitted = x @ weight.T + bias
    explained = 1 - float((fitted - norms).square().sum() / (norms - mean_n).square().sum().clamp_min(1e-30))
    return weight, bias, {"r2": explained, "tokens": len(x)}


def moe_nodes(program: Program) -> dict[str, Node]:
    """The program's `sparsec::moe` nodes by the module path of the FFN they replaced (their module stack's last)."""
    found = {}
    for node in program.graph.find_nodes(op="call_function", target=MOE):
        stack = node.meta.get("nn_module_stack") or {}
        found[list(stack.values())[-1][0] if stack else ""] = node
    return found


def rewrite_as_moe(
    program: Program,
    ffn: Ffn,
    group: ChannelGroup,
    shared_idx: torch.Tensor,
    stacked: dict,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    activation: str,
    top_k: int,
    gating: Gating,
    shared_gate: torch.Tensor | None = None,
) -> dict[str, str]:
    """Replace `ffn` by one `sparsec::moe` node of the experts `stacked` (the op's tensors) and return the new state
    names by role (`router_weight`, `fc1_weight`, ..., `shared_gate_weight`), each under `<ffn>.moe.`.

    With `shared_idx` the dense FFN stays, sliced to those neurons: the shared expert, added to the MoE's output;
    under one_plus_logit gated as in the paper, `shared(x) * (1 + gate_shared(x))` with `shared_gate` [1, H] (zeros
    if None: the paper's initialisation). The dense down bias (if any) stays with the shared expert, or is added to
    the MoE's output without one. Used by `ffn_to_moe` and by the paper's checkpoint importer (`moe_layout`).
    """
    graph = program.graph
    gate_shared = gating == "one_plus_logit" and len(shared_idx) > 0
    if gate_shared and shared_gate is None:
        shared_gate = router_weight.new_zeros(1, router_weight.shape[1])
    tensors = {
        "router_weight": router_weight,
        "router_bias": router_bias,
        **stacked,
        "shared_gate_weight": shared_gate if gate_shared else None,
    }
    prefix = f"{ffn.path}.moe" if ffn.path else "moe"
    names = {k: f"{prefix}.{k}" for k, v in tensors.items() if v is not None}
    nodes = {k: program.add_parameter(names[k], tensors[k]) if k in names else None for k in tensors}
    stack = _module_stack(ffn.down, ffn.path)
    down_bias = ffn.down.args[2] if len(ffn.down.args) > 2 else None
    if len(shared_idx):
        group.apply(program, shared_idx)
    with graph.inserting_after(ffn.down):
        moe = graph.call_function(
            MOE,
            (
                ffn.up.args[0],
                nodes["router_weight"],
                nodes["router_bias"],
                nodes["fc1_weight"],
                nodes["fc1_bias"],
                nodes["fc3_weight"],
                nodes["fc3_bias"],
                nodes["fc2_weight"],
                top_k,
                activation,
                gating,
            ),
        )
    added = [moe]
    if len(shared_idx):
        shared_out = ffn.down
        if gate_shared:  # shared(x) * (1 + gate_shared(x)); the paper writes shared + shared * gate_shared(x)
            with graph.inserting_after(moe):
                gate = graph.call_function(aten.linear.default, (ffn.up.args[0], nodes["shared_gate_weight"]))
            with graph.inserting_after(gate):
                one_plus = graph.call_function(aten.add.Tensor, (gate, 1.0))
            with graph.inserting_after(one_plus):
                shared_out = graph.call_function(aten.mul.Tensor, (ffn.down, one_plus))
            added += [gate, one_plus, shared_out]
        with graph.inserting_after(added[-1]):
            added.append(graph.call_function(aten.add.Tensor, (shared_out, moe)))
    elif down_bias is not None:
        with graph.inserting_after(moe):
            added.append(graph.call_function(aten.add.Tensor, (moe, down_bias)))
    out = added[-1]
    for node in added:
        node.meta["nn_module_stack"] = stack
    program.replace_uses(ffn.down, out, except_in=added[-2] if gate_shared else out)
    return names


def _float(stacked: dict) -> dict:
    return {k: None if v is None else v.float() for k, v in stacked.items()}


def _module_stack(node: Node, path: str) -> dict:
    """`node`'s module stack cut at the module `path` (new nodes belong to the FFN's module, not to `down`)."""
    stack = node.meta.get("nn_module_stack") or {}
    kept = {}
    for key, (module, kind) in stack.items():
        if module == path or path.startswith(module + ".") or not module:
            kept[key] = (module, kind)
        if module == path:
            break
    return kept
