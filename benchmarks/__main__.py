"""``python -m benchmarks [options]``: the same as ``ibllm-lab bench``."""

import logging
import sys

from ibllm_lab.bench import cli

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
sys.exit(cli(sys.argv[1:]))
