"""Hidden-width speed: ONNX Runtime CPU latency with the residual stream sliced to 75% and 50% of its channels.

A Qwen2-style model of realistic proportions with random weights (speed does not depend on them; the importance
is `magnitude`, so no calibration data is needed), widths rounded to multiples of 64. Slicing the stream narrows
every projection's input or output and the LM head, but not attention itself (heads and head_dim stay, so the
KV cache per token does not change). Each variant is measured at `--seq` and at 4x `--seq` (512 and 2048 by
default; `compare_at_two_lengths`): at the long sequence attention's share of the time grows, and the FLOP ideal
counts it (the attention core's matmuls included). See bench/common.py for the method.

    python bench/slice_hidden.py                   # hidden 1024, FFN 2816, 16 layers, seq 512 and 2048
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import compare_at_two_lengths, parser, qwen2_model  # noqa: E402

from sparsec.analysis.hidden import hidden_channel_group  # noqa: E402
from sparsec.transform.pass_manager import get_pass  # noqa: E402


def run(args) -> dict:
    """Dense vs the stream at 75% and 50% width, at seq `args.seq` and 4x that; results per variant and seq."""
    slice_ = get_pass("slice_hidden")
    variants = {
        "dense": [],
        "hidden 75%": [slice_(keep_ratio=0.75, importance="magnitude", round_to=64)],
        "hidden 50%": [slice_(keep_ratio=0.5, importance="magnitude", round_to=64)],
    }
    model = qwen2_model(argparse.Namespace(**{**vars(args), "seq": 4 * args.seq}))
    return compare_at_two_lengths(model, variants, args, lambda p: f"hidden {hidden_channel_group(p).width}")


def main() -> None:
    run(parser(__doc__.split("\n\n")[0]).parse_args())


if __name__ == "__main__":
    main()
