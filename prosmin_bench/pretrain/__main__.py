"""``python -m prosmin_bench.pretrain --recipe NAME [--epochs N] [--out DIR] [--resume] [--set k=v ...]``.

The same call as ``prosmin-bench pretrain``, reachable without the suite's CLI (the DDP tests launch it with
``python -m torch.distributed.run``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import distributed
from ..cli_args import positive_epochs
from ..errors import ProsminBenchError
from . import pretrain
from .config import ConfigError, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prosmin_bench.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--epochs", type=positive_epochs, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ns = parser.parse_args(argv)
    try:
        overrides = parse_overrides(ns.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = pretrain(ns.recipe, epochs=ns.epochs, out_dir=ns.out, resume=ns.resume, device=ns.device,
                        overrides=overrides)
    except ProsminBenchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    finally:
        distributed.destroy()
    logging.getLogger(__name__).info("final checkpoint: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
