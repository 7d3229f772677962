"""Width-pruning speed: ONNX Runtime CPU latency with every FFN sliced to 50% and 25% of its neurons.

A Qwen2-style model of realistic proportions with random weights (speed does not depend on them; the
importance is `magnitude`, so no calibration data is needed). See bench/common.py for the method.

    python bench/slice_neurons.py                  # hidden 1024, FFN 2816, 16 layers, seq 512
"""

import sys
from pathlib import Path

from sparsec.analysis.regions import region_index

sys.path.insert(0, str(Path(__file__).parent))
from common import compare_variants, parser, qwen2_model  # noqa: E402

from sparsec.transform.pass_manager import get_pass  # noqa: E402


def run(args) -> dict:
    """Dense vs every FFN at 50% and 25% width; results per variant (see `compare_variants`)."""
    slice_ = get_pass("slice_neurons")
    variants = {
        "dense": [],
        "FFN 50%": [slice_(keep_ratio=0.5, importance="magnitude", round_to=64)],
        "FFN 25%": [slice_(keep_ratio=0.25, importance="magnitude", round_to=64)],
    }
    return compare_variants(
        qwen2_model(args), variants, args, describe=lambda p: f"FFN width {region_index(p).ffns()[0].intermediate_size}"
    )


def main() -> None:
    run(parser(__doc__.split("\n\n")[0]).parse_args())


if __name__ == "__main__":
    main()
