"""`moe-infer` command line (also `python -m moe_infer`), DESIGN section 7.

User mistakes (bad arguments, bad files, unsupported models) print one line to stderr and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

USER_ERRORS = (ValueError, TypeError, NotImplementedError, FileNotFoundError, KeyError)


def _demo(args: argparse.Namespace) -> int:
    from moe_infer.demo import format_report, run_demo

    result = run_demo(args.model, prompt=args.prompt, new_tokens=args.new_tokens, device=args.device,
                      dtype=args.dtype)
    print(format_report(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-infer", description="Mixture-of-Experts inference for transformers models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="wrap a small MoE model, check its outputs, generate and report")
    demo.add_argument("--model", default="tiny-mixtral",
                      help="a shipped model (tiny-mixtral, tiny-deepseek), 'random-mixtral', or a transformers directory")
    demo.add_argument("--prompt", default="def main(")
    demo.add_argument("--new-tokens", type=int, default=64)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = str(err).strip("'\"") or type(err).__name__
        print(f"moe-infer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
