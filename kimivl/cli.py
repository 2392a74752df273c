"""The ``kimivl`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from kimivl.config import PRESETS, ConfigError, KimiVLConfig


def _fmt(n: int, billions: bool) -> str:
    return f"{n / 1e9:.3f}B" if billions else f"{n / 1e6:.3f}M"


def cmd_info(args: argparse.Namespace) -> int:
    from kimivl.model.params import parameter_counts

    config = KimiVLConfig.from_preset(args.preset) if args.preset else KimiVLConfig.from_pretrained(args.path)
    counts = parameter_counts(config)
    tc, vc = config.text_config, config.vision_config
    print(f"{args.preset or args.path}: vision {vc.num_hidden_layers}x{vc.hidden_size}, "
          f"LM {tc.num_hidden_layers}x{tc.hidden_size}, {tc.n_routed_experts} experts "
          f"(top-{tc.num_experts_per_tok}, {tc.n_shared_experts} shared), vocab {tc.vocab_size}")
    print(f"{'part':<24}{'total':>12}{'active':>12}")
    billions = counts["total"].total >= 1e9
    for name, c in counts.items():
        print(f"{name:<24}{_fmt(c.total, billions):>12}{_fmt(c.active, billions):>12}")
    print("active = parameters used per token (the routed experts count only the chosen ones)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimivl", description="Kimi-VL in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts of a checkpoint or preset (no weights are loaded)")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", help="checkpoint directory (its config.json)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in configuration")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"kimivl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
