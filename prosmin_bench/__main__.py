"""``python -m prosmin_bench`` (also under ``torchrun -m prosmin_bench``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
