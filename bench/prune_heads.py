"""Head-pruning speed: ONNX Runtime CPU latency with half the KV groups, and half the query heads of every group.

The Qwen2-style model of bench/common.py (hidden 1024: 16 query heads in 4 KV groups of 4, head_dim 64) with
random weights (speed does not depend on them; the importance is `magnitude`, so no calibration data is needed).
Each variant's row also gives its KV-cache bytes per token: the sum over layers of 2 * kv_heads * head_dim *
4 bytes (the FP32 export). Attention's share of the FLOPs grows with the sequence, so each variant is measured
at `--seq` and 4x `--seq` (512 and 2048 by default; `compare_at_two_lengths`); the FLOP ideal counts the attention
core's two matmuls (`sparsec.analysis.inspection.flops_by_path`). See bench/common.py for the method.

    python bench/prune_heads.py                    # hidden 1024, 16 heads / 4 KV, 16 layers, seq 512 and 2048
"""

import argparse
import sys
from pathlib import Path

from sparsec.analysis.heads import find_attentions

sys.path.insert(0, str(Path(__file__).parent))
from common import compare_at_two_lengths, parser, qwen2_model  # noqa: E402

from sparsec.transform.pass_manager import get_pass  # noqa: E402

FP32 = 4


def kv_cache_bytes_per_token(program) -> int:
    """Sum over attentions of 2 (k and v) * KV heads * head_dim * 4 bytes."""
    return sum(2 * a.num_kv_heads * a.head_dim * FP32 for a in find_attentions(program))


def run(args) -> dict:
    """Dense vs half the KV groups (`unit: kv_group`) vs half the query heads per group (`unit: query`)."""
    prune = get_pass("prune_heads")
    variants = {
        "dense": [],
        "heads 50% (kv_group)": [prune(keep_ratio=0.5, unit="kv_group", importance="magnitude")],
        "heads 50% (query)": [prune(keep_ratio=0.5, unit="query", importance="magnitude")],
    }
    # at least 2 KV groups of 2 (the suite's --quick hidden 128 would give one group of 2)
    long = argparse.Namespace(**{**vars(args), "seq": 4 * args.seq})
    model = qwen2_model(long, heads=max(4, args.hidden // 64), kv_heads=max(2, args.hidden // 256))

    def describe(program) -> str:
        (a, *_) = find_attentions(program)
        return f"{a.num_heads} heads / {a.num_kv_heads} KV, KV cache {kv_cache_bytes_per_token(program)} B/token"

    return compare_at_two_lengths(model, variants, args, describe)


def main() -> None:
    run(parser(__doc__.split("\n\n")[0]).parse_args())


if __name__ == "__main__":
    main()
