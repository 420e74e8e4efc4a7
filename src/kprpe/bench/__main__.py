"""``python -m kprpe.bench [options]``: the same as ``kprpe bench``."""

import argparse
import sys

from ..cli.bench import add_arguments

parser = argparse.ArgumentParser(
    prog="python -m kprpe.bench", description="KP-RPE speed/memory benchmark", allow_abbrev=False
)
add_arguments(parser)
args = parser.parse_args()
sys.exit(args.func(args))
