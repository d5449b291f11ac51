"""The `saelab` command: a thin layer over library functions that a notebook can call as well.

Each subcommand takes `--config FILE.yaml` plus `key=value` overrides (dotted for nested keys,
e.g. `corpus.path=data.jsonl`). Bad input is reported in one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from saelab.errors import SaelabError


def _harvest(args: argparse.Namespace) -> None:
    from saelab.config import load_config
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest

    cfg = load_config(HarvestConfig, args.config, args.overrides)
    manifest = harvest(cfg, progress=not args.quiet)
    size = sum(shard.bytes for shard in manifest.shards) / 2**20
    print(
        f"activation store: {cfg.out}\n"
        f"  {manifest.n_rows:,} tokens × {len(manifest.hooks)} hook(s) ({', '.join(manifest.hooks)}), "
        f"d_model {manifest.d_model}, {manifest.dtype}, {len(manifest.shards)} shard(s), {size:,.1f} MiB"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    harvest = commands.add_parser("harvest", help="cache residual-stream activations to a sharded store")
    harvest.add_argument("--config", help="YAML config (see configs/); keys not given take their defaults")
    harvest.add_argument("--quiet", action="store_true", help="no progress bar")
    harvest.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. n_tokens=10000")
    harvest.set_defaults(run=_harvest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except SaelabError as error:
        print(f"saelab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saelab {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0
