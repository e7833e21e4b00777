"""The ``ibllm-lab`` console command.

Each subcommand lives beside the library code it drives, as a function ``cli(argv) -> int``
in that module; this file only dispatches, importing lazily so that ``ibllm-lab --help``
stays fast and a library import never needs the notebook extras.
"""

from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ibllm_lab.report", "run the notebooks with papermill and write reports/<run>/"),
    "world": ("ibllm_lab.world", "generate the embedded default's multimodal world"),
    "encoders": ("ibllm_lab.encoders", "train BindLite encoders and measure the joint space"),
    "train": ("ibllm_lab.train", "train the base LM or a pre-training / fine-tuning phase"),
    "transfer": ("ibllm_lab.transfer", "run the cross-modal transfer experiment"),
    "eval": ("ibllm_lab.evaluate", "evaluate a model on a benchmark"),
    "bench": ("ibllm_lab.bench", "run the speed benchmarks in benchmarks/"),
}


def _usage() -> str:
    lines = ["usage: ibllm-lab <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'ibllm-lab <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ibllm-lab: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
