#!/usr/bin/env python
"""Pretrain an EGG integer language model with EGGROLL.

    python train.py                                  # CPU default config, stdlib corpus
    python train.py --config configs/tiny.toml --train.steps 20
    python train.py --data.source /path/to/corpus.txt --es.population 1024
    python train.py --train.run_dir runs/x           # resumes runs/x from its latest checkpoint

Any config key can be overridden as ``--section.key value`` (all of them are listed
below, with their defaults and meanings); ``--debug`` shows tracebacks for user errors. A run directory with checkpoints resumes exactly
(``--train.resume_from STEP`` picks an older one). Several hosts: the same command on
each with ``--dist.coordinator_address HOST:PORT --dist.num_processes N
--dist.process_id I`` (or JAX_* / SLURM environment variables); see docs/distributed.md.

Ctrl-C, ``kill`` (SIGTERM), a lost terminal (SIGHUP) or SLURM's ``--signal=USR1@120``
finish the current step, save it and exit with 128 + the signal number (a second
signal stops at once); run the same command to resume. See docs/checkpoints.md.
"""
import argparse
import sys

from int_lm.cli import run_main


def main(argv=None):
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.toml",
                        help="TOML config file (a path or a name in configs/)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")

    def body(args, cfg):
        from int_lm.checkpoint import explicit_values
        from int_lm.stopping import exit_status
        from int_lm.trainer import train
        summary = train(cfg, overrides=explicit_values(args.config if args.config_given else None, args.overrides))
        return exit_status(summary["signal"]) if summary["signal"] else 0

    return run_main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
