"""Depth-pruning speed: ONNX Runtime CPU latency with 25% and 50% of the blocks dropped, against dense.

A Qwen2-style model of realistic proportions with random weights (speed does not depend on them); every
other block is dropped. See bench/common.py for how variants are compiled, timed and compared.

    python bench/drop_layers.py                    # hidden 1024, 16 layers, seq 512
    python bench/drop_layers.py --layers 4 --hidden 256 --intermediate 704 --vocab 1000 --seq 128 --reps 3
"""

import sys
from pathlib import Path

from sparsec.analysis.regions import region_index

sys.path.insert(0, str(Path(__file__).parent))
from common import compare_variants, parser, qwen2_model  # noqa: E402

from sparsec.transform.pass_manager import get_pass  # noqa: E402


def run(args) -> dict:
    """Dense vs 25% and 50% of the blocks dropped; results per variant (see `compare_variants`)."""
    drop = get_pass("drop_layers")
    odd = list(range(1, args.layers, 2))
    variants = {
        "dense": [],
        "drop 25%": [drop(layers=odd[: args.layers // 4])],
        "drop 50%": [drop(layers=odd[: args.layers // 2])],
    }
    return compare_variants(
        qwen2_model(args), variants, args, describe=lambda p: f"{len(region_index(p).blocks())} blocks"
    )


def main() -> None:
    run(parser(__doc__.split("\n\n")[0]).parse_args())


if __name__ == "__main__":
    main()
