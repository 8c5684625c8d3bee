"""``mlx-llama4 convert`` / ``python -m mlx_llama4.convert``: flags in mlx-lm's convention."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .policy import MODES, RECIPES


def configure_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The converter's flags, on ``parser`` (e.g. a ``convert`` sub-command) or on a new parser."""
    parser = parser or argparse.ArgumentParser(
        prog="mlx-llama4 convert",
        description="Convert a Llama 4 checkpoint (Hugging Face bf16, per-expert, FP8, or mlx-community) to MLX, "
        "optionally quantized.",
    )
    parser.add_argument("--hf-path", "--model", required=True, help="Hub repo id or local checkpoint folder.")
    parser.add_argument("--mlx-path", default="mlx_model", help="Output folder (default: mlx_model).")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    parser.add_argument("--q-bits", type=int, default=None,
                        help="Bits per weight (affine: 2, 3, 4, 5, 6 or 8, and 1 where the installed MLX has it, "
                        "as 0.32.4 does; default 4; fixed by the fp modes).")
    parser.add_argument("--q-group-size", type=int, choices=(16, 32, 64, 128), default=None,
                        help="Group size (affine: 32, 64, 128; default 64; mxfp4/mxfp8 32, nvfp4 16).")
    parser.add_argument("--q-mode", choices=MODES, default="affine", help="Quantization mode (default affine).")
    parser.add_argument("--quant-recipe", default=None, metavar="mixed_L_H",
                        help="Mixed recipe: routed experts at L bits, attention / shared expert / dense FFN at H, "
                        f"embeddings and lm_head at max(H, 6); e.g. {', '.join(RECIPES)}. Implies -q.")
    parser.add_argument("--quantize-vision", action="store_true",
                        help="Also quantize the vision tower and projector (kept float by default).")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="Float dtype to write (default: the source's).")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit.")
    parser.add_argument("-d", "--dequantize", action="store_true",
                        help="Write float weights from a quantized (mlx-community) source.")
    parser.add_argument("--upload-repo", default=None, help="Hub repo to upload the result to.")
    parser.add_argument("--force", action="store_true", help="Replace a non-empty --mlx-path.")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest output shard (default 5GB).")
    parser.add_argument("--quiet", action="store_true", help="No progress output.")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a conversion from parsed flags; returns the exit status (errors are printed, not raised)."""
    from mlx_llama4.config import ConfigError
    from mlx_llama4.weights import CheckpointError

    from .core import ConvertError, convert
    from .policy import QuantizationOptionError

    try:
        convert(
            args.hf_path, args.mlx_path, quantize=args.quantize, q_group_size=args.q_group_size, q_bits=args.q_bits,
            q_mode=args.q_mode, quant_recipe=args.quant_recipe, quantize_vision=args.quantize_vision,
            dtype=args.dtype, upload_repo=args.upload_repo, revision=args.revision, dequantize=args.dequantize,
            force=args.force, max_shard_size=args.max_shard_size, verbose=not args.quiet,
        )
    except (ConvertError, ConfigError, CheckpointError, QuantizationOptionError, FileNotFoundError,
            NotADirectoryError, PermissionError) as e:  # input errors: exit 2, as every mlx-llama4 subcommand
        print(f"mlx-llama4 convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlx-llama4 convert: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run(configure_parser().parse_args(argv))
