#!/usr/bin/env python
"""Evaluate a trained EGG model on held-out text, or generate text from it.

    python eval.py runs/default                          # validation split of the training corpus
    python eval.py runs/default --split test --json      # one JSON object on stdout
    python eval.py model.safetensors --data.source other.txt --max_bytes 1000000   # transfer
    python eval.py runs/default --generate "def main(" --max_new_tokens 200 --temperature 0.8 --top_k 20
    python eval.py runs/default --generate "import " --greedy

The checkpoint's own data settings are used unless overridden with ``--data.KEY
VALUE``; a different corpus measures transfer, a different tokenizer is refused.
Results are also written as TensorBoard scalars into RUN_DIR/tb at the
checkpoint's step (not for exported files, or with --no_tb). See docs/eval.md.
"""
import argparse
import json
import sys

from int_lm.cli import run_main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory (latest checkpoint) or an exported .safetensors file")
    parser.add_argument("--step", type=int, default=None, help="evaluate this checkpoint step of a run")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--max_bytes", type=int, default=None, help="evaluate only a prefix of this many bytes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--rows", type=int, default=None, help="rows evaluated in parallel (default: auto)")
    parser.add_argument("--block", type=int, default=None, help="tokens per jitted block (default: auto, <= 256)")
    parser.add_argument("--no_tb", action="store_true", help="do not write TensorBoard scalars")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--generate", metavar="PROMPT", default=None, help="generate a continuation of PROMPT")
    gen.add_argument("--max_new_tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    gen.add_argument("--num_samples", type=int, default=1)
    gen.add_argument("--no_stop", action="store_true", help="keep going past an end-of-document token")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")

    def body(args, _cfg):
        from int_lm.config import apply_values
        from int_lm.errors import UserError

        values = args.overrides          # --data.KEY only (run_main refuses the rest)
        for flag, value in (("--rows", args.rows), ("--block", args.block), ("--max_bytes", args.max_bytes)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be >= 1 (omit it for the default), got {value}")
        from int_lm.checkpoint import load_model

        loaded = load_model(args.path, args.step) if args.step is not None else load_model(args.path)
        data_cfg = apply_values(loaded.config, {"data": values.get("data", {})}, "the command line").data
        progress = not args.no_progress and sys.stderr.isatty()
        if args.generate is not None:
            return run_generate(args, loaded, data_cfg)
        from int_lm import evaluate

        log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
        report = evaluate.evaluate(loaded, data_cfg, split=args.split, max_bytes=args.max_bytes, rows=args.rows,
                             length=args.block, progress=progress, log=log)
        report["checkpoint"] = str(getattr(loaded, "source", args.path))
        if not args.no_tb and getattr(loaded, "kind", "checkpoint") == "checkpoint":
            from pathlib import Path
            tb_dir = Path(report["checkpoint"]) / "tb"
            try:
                prefix = evaluate.write_tensorboard(tb_dir, report)
                report["tensorboard"] = f"{tb_dir} ({prefix}/* at step {report['step']})"
            except OSError as err:
                print(f"warning: could not write TensorBoard scalars to {tb_dir} ({err.strerror})",
                      file=sys.stderr)
        if args.json:
            print(json.dumps(report))
        else:
            print(evaluate.format_report(report))

    return run_main(parser, body, argv, warn_when_output_lost=False,   # `eval.py ... | head` ends quietly
                    sections=("data",), help_defaults=False,
                    help_note="eval.py takes only the [data] keys (the model comes from the checkpoint); each "
                              "defaults to the checkpoint's own value.")


def run_generate(args, loaded, data_cfg):
    import time

    from int_lm import data
    from int_lm import evaluate
    from int_lm import generate
    from int_lm import model

    shape = model.ModelShape.from_config(loaded.config.model)
    tok = data.make_tokenizer(data_cfg)
    evaluate.check_tokenizer((loaded.metadata or {}).get("tokenizer"), tok, shape)
    prompt_ids = tok.encode(args.generate)
    t0 = time.perf_counter()
    out = generate.generate(loaded.params, shape, prompt_ids, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, seed=args.seed, greedy=args.greedy,
                     num_samples=args.num_samples)
    dt = time.perf_counter() - t0
    samples = []
    for row in out:
        ids, ended = (row, False) if args.no_stop else generate.cut_at_boundary(row, shape.boundary_token)
        samples.append({"ids": [int(i) for i in ids], "ended": ended,
                        "text": generate.safe_text(tok.decode_bytes(ids))})
    if args.json:
        print(json.dumps({"prompt": args.generate, "step": loaded.step, "mode": generate.describe(args),
                          "samples": samples, "wall_s": round(dt, 3)}))
        return
    print(f"int_lm generate: step {loaded.step}, {generate.describe(args)}, {args.max_new_tokens} new tokens "
          f"({out.size / dt:,.0f} tokens/s incl. compile)", file=sys.stderr)
    for i, s in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i}")
        print(generate.safe_text(args.generate.encode("utf-8")) + s["text"] + ("\n[end of document]" if s["ended"] else ""))


if __name__ == "__main__":
    sys.exit(main())
