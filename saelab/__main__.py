"""`python -m saelab …` is the `saelab` command (and what `torchrun -m saelab` launches)."""

from saelab.cli import main

raise SystemExit(main())
