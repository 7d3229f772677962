"""Which partition, router and shared expert make `ffn_to_moe` beat a static slice on a real LLM (a search).

Simulates the MoE FFN inside the Hugging Face model (each FFN computes its neurons densely, then keeps per token
only the neurons of the shared expert and of its k chosen experts: what `torch.ops.sparsec.moe` with unit gating
computes) so that many settings can be compared quickly, and measures held-out perplexity on text (one paragraph
per sample, the tokenizer's own special tokens, truncated to 256 tokens; `sparsec.data.language_model`).
Partitions and routers come from `ffn_to_moe` itself; `oracle` routing picks each token's experts by their true
activation mass sum_j |h_j| ||W_down[:, j]|| (an upper bound that separates the partition from the router).

    python bench/moe_search.py --model DIR --calib calib.txt --eval eval.txt [--configs NAME,...] [--json OUT]

`--compile RECIPE.yaml ...` instead runs `sparsec compile` (gates off, no ONNX) for each recipe and measures the
compiled `program.pt2` on the same paragraphs (and the Hugging Face model for dense, which must agree exactly):

    python bench/moe_search.py --model DIR --calib calib.txt --eval eval.txt --compile a.yaml b.yaml --work-dir W
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.data.language_model import NextTokenLoss, next_token_loss
from sparsec.passes.ffn_to_moe import ExpertWeights, FfnToMoe


@dataclass(frozen=True)
class Setting:
    """One MoE (or slice) setting of every FFN: `kind` slice|moe; for moe its options and a router."""

    name: str
    kind: str
    keep: int = 0  # slice: neurons kept
    experts: int = 16
    top_k: int = 8
    shared: int = 0  # neurons of the shared expert
    partition: str = "balanced"
    router: str = "learned"  # a router of ffn_to_moe, or oracle
    gating: str = "unit"


def read_lines(path: str, count: int) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()][:count]


def mlp_inputs(model, tokenizer, lines: list[str], seq_len: int) -> list[torch.Tensor]:
    """Per layer, the FFN inputs [tokens, H] at the valid tokens of the dense model on `lines`."""
    layers = model.model.layers
    found: list[list[torch.Tensor]] = [[] for _ in layers]
    mask_holder: dict[str, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda m, args, i=i: found[i].append(args[0][mask_holder["mask"]].detach().clone())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        for start in range(0, len(lines), 16):
            batch = tokenizer(
                lines[start : start + 16], return_tensors="pt", padding=True, truncation=True, max_length=seq_len
            )
            mask_holder["mask"] = batch["attention_mask"].bool()
            with torch.no_grad():
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(f) for f in found]


def perplexity(model, tokenizer, paragraphs: list[str], max_tokens: int = 256) -> float:
    """Held-out perplexity: one paragraph per sample (batch 1, no padding), the tokenizer's own special tokens,
    truncated to `max_tokens`; `model(input_ids=, attention_mask=)` returns an object with `.logits` or a dict."""
    total = NextTokenLoss()
    for text in paragraphs:
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out["logits"] if isinstance(out, dict) else out.logits
        total = total + next_token_loss(logits, batch["input_ids"])
    return total.perplexity


def compile_and_measure(args, tokenizer, paragraphs: list[str]) -> list[dict]:
    """`sparsec compile` each recipe of `args.compile` (its own calibration/quality/export sections are kept as
    written) and measure the compiled program's held-out perplexity."""
    import subprocess
    import sys
    from pathlib import Path

    import sparsec

    rows = []
    for recipe in args.compile:
        out = Path(args.work_dir) / Path(recipe).stem
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sparsec.cli", "compile", "--model", args.model, "--recipe", recipe,
             "--calib", args.calib, "--out", str(out), "--quiet"],
            check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        module = sparsec.load_program(out / "program.pt2").module()
        row = {"recipe": recipe, "perplexity": perplexity(module, tokenizer, paragraphs), "compile_s": round(seconds)}
        report = out / "report.json"
        if report.exists():
            row["report"] = str(report)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


class SimulatedMoe(torch.nn.Module):
    """A dense FFN computing only a per-token subset of its neurons (shared + chosen experts' or a fixed slice)."""

    def __init__(self, mlp, setting: Setting, assignment, shared_mask, router_weight, router_bias, down_norm):
        super().__init__()
        self.mlp, self.setting = mlp, setting
        self.assignment = assignment  # [E, I] float 0/1, or None for a slice
        self.shared_mask = shared_mask  # [I] float 0/1
        self.router_weight, self.router_bias, self.down_norm = router_weight, router_bias, down_norm

    def forward(self, x):
        m = self.mlp
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        if self.assignment is None:
            return m.down_proj(h * self.shared_mask)
        s = self.setting
        if s.router == "oracle":
            scores = h.abs() @ (self.assignment * self.down_norm).T
        else:
            scores = F.linear(x.float(), self.router_weight, self.router_bias)
        chosen = scores.topk(s.top_k, dim=-1).indices
        if s.gating == "unit":
            weight = torch.ones_like(chosen, dtype=h.dtype)
        else:
            p = scores.softmax(-1).gather(-1, chosen)
            weight = p if s.gating == "softmax" else p / p.sum(-1, keepdim=True)
        gate = torch.zeros(*scores.shape, dtype=h.dtype).scatter_(-1, chosen, weight)
        return m.down_proj(h * (gate @ self.assignment + self.shared_mask))


def build(model, inputs: list[torch.Tensor], setting: Setting, max_tokens: int, seed: int) -> list:
    """The simulated FFNs of every layer for `setting` (from calibration FFN inputs `inputs`)."""
    modules = []
    generator = torch.Generator().manual_seed(seed)
    for layer, x in zip(model.model.layers, inputs):
        mlp = layer.mlp.mlp if isinstance(layer.mlp, SimulatedMoe) else layer.mlp
        x = x[:max_tokens]
        with torch.no_grad():
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        down_norm = mlp.down_proj.weight.norm(dim=0)
        score = h.abs().mean(0) * down_norm  # sparsec's activation importance
        width = h.shape[1]
        if setting.kind == "slice":
            mask = torch.zeros(width)
            mask[score.topk(setting.keep).indices] = 1.0
            modules.append(SimulatedMoe(mlp, setting, None, mask, None, None, down_norm))
            continue
        options = FfnToMoe.Options(
            experts=setting.experts,
            top_k=setting.top_k,
            shared=setting.shared / width,
            partition=setting.partition,
            router="learned" if setting.router == "oracle" else setting.router,
            seed=seed,
        )
        moe = FfnToMoe(options)
        weights = ExpertWeights(mlp.gate_proj.weight, None, mlp.up_proj.weight, None, mlp.down_proj.weight)
        shared = setting.shared + (width - setting.shared) % setting.experts
        with torch.no_grad():
            shared_idx, experts = moe._partition(weights, "silu", score, shared, x)
        assignment = torch.zeros(setting.experts, width)
        for e, idx in enumerate(experts):
            assignment[e, idx] = 1.0
        shared_mask = torch.zeros(width)
        shared_mask[shared_idx] = 1.0
        rw = rb = None
        if setting.router != "oracle":
            with torch.no_grad():
                rw, rb, _ = moe._router(weights.stacked(experts), "silu", x, generator)
            rw, rb = rw.float(), None if rb is None else rb.float()
        modules.append(SimulatedMoe(mlp, setting, assignment, shared_mask, rw, rb, down_norm))
    return modules


SETTINGS = {
    s.name: s
    for s in [
        Setting("dense", "slice", keep=1536),
        Setting("slice50", "slice", keep=768),
        Setting("slice25", "slice", keep=384),
        Setting("bal_learned_8", "moe"),
        Setting("bal_oracle_8", "moe", router="oracle"),
        Setting("kmeans_oracle_8", "moe", partition="kmeans", router="oracle"),
        Setting("coact_oracle_8", "moe", partition="coactivation", router="oracle"),
        Setting("coact_learned_8", "moe", partition="coactivation"),
        Setting("kmeans_learned_8", "moe", partition="kmeans"),
        Setting("bal_learned_8_renorm", "moe", gating="renormalized"),
        Setting("bal_learned_8_softmax", "moe", gating="softmax"),
        # shared expert of the top neurons, equal active width: 512 + 4 x 64 = 768
        Setting("sh512_bal_oracle_4", "moe", top_k=4, shared=512, router="oracle"),
        Setting("sh512_bal_learned_4", "moe", top_k=4, shared=512),
        Setting("sh512_coact_oracle_4", "moe", top_k=4, shared=512, partition="coactivation", router="oracle"),
        Setting("sh512_coact_learned_4", "moe", top_k=4, shared=512, partition="coactivation"),
        Setting("sh512_kmeans_learned_4", "moe", top_k=4, shared=512, partition="kmeans"),
        Setting("sh512_coact_sim_4", "moe", top_k=4, shared=512, partition="coactivation", router="similarity"),
        Setting("sh512_coact_regr_4", "moe", top_k=4, shared=512, partition="coactivation", router="regression"),
        Setting("sh512_bal_regr_4", "moe", top_k=4, shared=512, router="regression"),
        Setting("bal_regr_8", "moe", router="regression"),
        Setting("coact_regr_8", "moe", partition="coactivation", router="regression"),
        Setting("sh384_coact_regr_5", "moe", top_k=5, shared=384, partition="coactivation", router="regression"),
        Setting("sh640_coact_regr_2", "moe", top_k=2, shared=640, partition="coactivation", router="regression"),
        # a quarter: 384 active
        Setting("bal_learned_4", "moe", top_k=4),
        Setting("bal_oracle_4", "moe", top_k=4, router="oracle"),
        Setting("coact_learned_4", "moe", top_k=4, partition="coactivation"),
        Setting("sh256_coact_learned_2", "moe", top_k=2, shared=256, partition="coactivation"),  # 256 + 2 x 80
        Setting("sh224_coact_regr_2", "moe", top_k=2, shared=224, partition="coactivation", router="regression"),
        Setting("sh128_coact_regr_3", "moe", top_k=3, shared=128, partition="coactivation", router="regression"),
        Setting("coact_regr_4", "moe", top_k=4, partition="coactivation", router="regression"),
        Setting("sh256_coact_oracle_2", "moe", top_k=2, shared=256, partition="coactivation", router="oracle"),
    ]
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--configs", default=",".join(SETTINGS))
    parser.add_argument("--json")
    parser.add_argument("--compile", nargs="+", help="recipes to compile and measure instead of simulating")
    parser.add_argument("--work-dir", default="moe_search_out")
    parser.add_argument("--no-reference", action="store_true", help="skip the Hugging Face model's perplexity")
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    paragraphs = read_lines(args.eval, args.eval_samples)
    if args.compile:
        rows = (
            []
            if args.no_reference
            else [{"recipe": "huggingface", "perplexity": perplexity(model, tokenizer, paragraphs)}]
        )
        print(*map(json.dumps, rows), flush=True)
        rows += compile_and_measure(args, tokenizer, paragraphs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    inputs = mlp_inputs(model, tokenizer, read_lines(args.calib, args.calib_samples), args.seq_len)
    originals = [layer.mlp for layer in model.model.layers]
    results = []
    for name in args.configs.split(","):
        setting = SETTINGS[name]
        start = time.perf_counter()
        if name != "dense":
            for layer, module in zip(model.model.layers, build(model, inputs, setting, args.max_tokens, 0)):
                layer.mlp = module
        built = time.perf_counter() - start
        ppl = perplexity(model, tokenizer, paragraphs)
        for layer, mlp in zip(model.model.layers, originals):
            layer.mlp = mlp
        width = model.config.intermediate_size
        active = (
            setting.keep
            if setting.kind == "slice"
            else setting.shared
            + (width - setting.shared) % setting.experts
            + setting.top_k * ((width - setting.shared) // setting.experts)
        )
        row = {"setting": name, "active_neurons": active, "perplexity": ppl, "build_s": round(built, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
