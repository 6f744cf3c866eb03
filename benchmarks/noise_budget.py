#!/usr/bin/env python
"""Where the noise in EGGROLL's votes comes from: how much of a pair's score difference is signal.

    python benchmarks/noise_budget.py --config configs/tinyshakespeare.toml \
        --data.source PATH/tinyshakespeare.txt --tokens 50 100 200 --blocks
    python benchmarks/noise_budget.py --config configs/tinyshakespeare.toml \
        --data.source PATH/tinyshakespeare.txt --checkpoint runs/tinyshakespeare --step 16000

A pair's score difference is ``d = s(theta + eps) - s(theta - eps) ~ 2 eps . g_text``: the
direction's effect on the loss of the pair's own text. Only the part ``eps . g`` that every
text shares (``g``, the expected gradient) is what the population's vote is after; the text's
own part is noise, and it enters the vote of every weight the direction touches. This script
measures that split directly. For each draw of the population's noise it scores every pair
on two independent sets of texts (each pair: a random place of the train split, its state
built by the unperturbed model over ``--warmup`` tokens before it), so

    rho = corr(d on texts A, d on texts B)  =  |g . eps|^2 share of var(d)

is the signal share of one pair's measurement (mean and standard error over ``--draws``).
One step's vote then holds ``P rho / n`` of the signal energy it would hold without noise
(P pairs, n weights): the number it prints as "steps for signal = noise".

``--blocks`` repeats it with only one block of the model perturbed (embedding, head, GRU
matrices, MLP matrices, vectors), giving each block's share of var(d) and its own rho.
Scaling each block's noise by its own factor is a diagonal change of variables; by
Cauchy-Schwarz the best such scaling multiplies the vote's signal-to-noise ratio by at most
``sqrt(sum rho_k^2 b_k sum b_k) / sum rho_k b_k`` (b_k the block's variance), printed as the
"per-block sigma bound". ``--aggregations`` rates robust statistics of a pair's per-token
differences (each clipped, or only their signs counted) by how much of the plain sum's signal
they keep: their own signal share can be far higher and still measure another objective.
The scores are the trainer's (``eggroll.member_log_likelihoods`` on ``eggroll.make_noise``);
only the texts and states are chosen here. Findings: docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import common  # noqa: F401  (puts this checkout first on the path)
import jax
import jax.numpy as jnp
import numpy as np

from int_lm import checkpoint, config, data, eggroll, model, trainer
from int_lm.cli import run_main
from int_lm.errors import UserError

# Blocks of the model, by parameter name (stacked layers count as one block).
BLOCKS = {
    "embedding": ("embed",),
    "head": ("head",),
    "GRU matrices": ("Wf", "Uf", "Wh", "Uh"),
    "MLP matrices": ("up", "down"),
    "vectors": ("ln_out", "ln1", "ln2", "bf", "bh"),
}
NOISE_EPOCH = 1 << 30   # noise epochs far from any training step's


def block_noise(noise: dict, names) -> dict:
    """``noise`` with every parameter outside ``names`` unperturbed (None: all perturbed).

    Zero A factors (matrices) or zero a (vectors) make the member's parameter the
    unperturbed one exactly, as if that parameter took no noise.
    """
    if names is None:
        return noise
    return {path: (a if path[-1] in names else jnp.zeros_like(a), b) for path, (a, b) in noise.items()}


def signal_share(d_a: np.ndarray, d_b: np.ndarray) -> float:
    """corr(d_A, d_B): the share of var(d) that two independent texts agree on."""
    d_a, d_b = d_a - d_a.mean(), d_b - d_b.mean()
    denom = math.sqrt(float(np.sum(d_a * d_a)) * float(np.sum(d_b * d_b)))
    return float(np.sum(d_a * d_b)) / denom if denom > 0 else 0.0


def sigma_bound(variances: list[float], rhos: list[float]) -> float:
    """Best gain in the vote's signal-to-noise ratio from scaling each block's noise (Cauchy-Schwarz).

    With block k's noise scaled by c_k, the signal in the vote is sum c_k rho_k b_k and its
    noise sqrt(sum c_k^2 b_k); c_k proportional to rho_k maximises the ratio. Negative
    estimates of rho count as 0.
    """
    b = np.asarray(variances, np.float64)
    r = np.clip(np.asarray(rhos, np.float64), 0.0, None)
    now = float(np.sum(r * b)) / math.sqrt(float(np.sum(b)))
    best = math.sqrt(float(np.sum(r * r * b)))
    return best / now if now > 0 else float("nan")


class Texts:
    """Independent random places of the train split, with the unperturbed model's state before each."""

    def __init__(self, tokens: np.ndarray, shape: model.ModelShape, warmup: int, seed: int):
        self.tokens, self.warmup = tokens, warmup
        self.rng = np.random.default_rng(seed)

        def warm(params, seg):
            states = model.init_state(shape, seg.shape[0])
            if warmup == 0:
                return states
            _, states = model.forward(params, states, seg[:, :-1], seg[:, 1:], shape.boundary_token)
            return states
        self._warm = jax.jit(warm)

    def draw(self, params, rows: int, length: int):
        """(member tokens (2 rows, length + 1), member states (L, 2 rows, D)): both members of a pair share both."""
        span = self.warmup + length + 1
        if len(self.tokens) < span + 1:
            raise UserError(f"the train split has {len(self.tokens)} tokens, fewer than --warmup + tokens + 1 "
                             f"= {span}; lower --warmup or --tokens")
        starts = self.rng.integers(0, len(self.tokens) - span, size=rows)
        seg = np.asarray(self.tokens[starts[:, None] + np.arange(span)[None, :]]).astype(np.int32)
        states = self._warm(params, jnp.asarray(seg[:, :self.warmup + 1]))
        return (jnp.asarray(np.repeat(seg[:, self.warmup:], 2, axis=0)),
                jnp.repeat(states, 2, axis=1))


def aggregate(name: str, diffs: np.ndarray) -> np.ndarray:
    """A pair's statistic from its per-token differences (P, T): the trainer's sum, or a robust alternative.

    ``clipQ``: each token's difference clipped to the Q-th percentile of |difference| over the set;
    ``sign``: the count of tokens the + member predicts better minus those it predicts worse.
    """
    if name == "sum":
        return diffs.sum(axis=1)
    if name == "sign":
        return np.sign(diffs).sum(axis=1)
    c = np.quantile(np.abs(diffs), int(name[len("clip"):]) / 100.0)
    return np.clip(diffs, -c, c).sum(axis=1)


AGGREGATIONS = ("sum", "clip90", "clip50", "sign")


def measure(spec: eggroll.EggrollSpec, params, texts: Texts, lengths, draws: int, blocks: bool,
            seed: int, aggregations: bool = False, log=print) -> dict:
    """{length: {block: {"var": mean var(d), "rho": mean, "rho_se": standard error, "draws": [...]}}}.

    With ``aggregations``, ``{length: {"aggregations": {name: {"rho": ..., "cross": ...}}}}`` too:
    each robust statistic's own signal share and its correlation with the plain sum on the other texts.
    """
    pairs_n = spec.population // 2
    pairs = jnp.arange(pairs_n, dtype=jnp.int32)
    noise_fn = jax.jit(lambda epoch: eggroll.make_noise(spec, seed, epoch, pairs))
    ll_fn = jax.jit(lambda p, n, s, t: eggroll.member_log_likelihoods(spec, p, n, s, t)[0])
    chosen = {"all": None, **(BLOCKS if blocks else {})}
    out = {}
    for length in lengths:
        rows = {name: {"var": [], "rho": []} for name in chosen}
        aggs = {name: {"rho": [], "cross": []} for name in AGGREGATIONS}
        for k in range(draws):
            noise = noise_fn(np.uint32(NOISE_EPOCH + k))
            sets = [texts.draw(params, pairs_n, length) for _ in range(2)]
            for name, names in chosen.items():
                n = block_noise(noise, names)
                per_token = []
                for tokens, states in sets:
                    ll = np.asarray(ll_fn(params, n, states, tokens), np.float64)
                    per_token.append(ll[0::2] - ll[1::2])
                d = [x.sum(axis=1) for x in per_token]
                rows[name]["var"].append(0.5 * (d[0].var() + d[1].var()))
                rows[name]["rho"].append(signal_share(d[0], d[1]))
                if aggregations and name == "all":
                    for agg in AGGREGATIONS:
                        f = [aggregate(agg, x) for x in per_token]
                        aggs[agg]["rho"].append(signal_share(f[0], f[1]))
                        aggs[agg]["cross"].append(0.5 * (signal_share(f[0], d[1]) + signal_share(d[0], f[1])))
        out[length] = {}
        for name, r in rows.items():
            out[length][name] = {"var": float(np.mean(r["var"])), **mean_se(r["rho"], "rho"),
                                 "draws": [round(x, 5) for x in r["rho"]]}
        if aggregations:
            out[length]["aggregations"] = {name: {**mean_se(a["rho"], "rho"), **mean_se(a["cross"], "cross")}
                                           for name, a in aggs.items()}
        a = out[length]["all"]
        log(f"  T = {length}: var(d) {a['var']:.0f}, rho {a['rho']:.4f} +- {a['rho_se']:.4f}")
    return out


def mean_se(values, key: str) -> dict:
    v = np.asarray(values, np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {key: float(v.mean()), f"{key}_se": se}


def block_sizes(shape: model.ModelShape) -> dict[str, int]:
    """Weights in each block of ``BLOCKS``."""
    leaves = model.param_leaves(shape)
    return {name: sum(int(np.prod(s)) for p, s, _ in leaves if p[-1] in names) for name, names in BLOCKS.items()}


def report(result: dict, spec: eggroll.EggrollSpec) -> str:
    pairs, n_weights, sizes = spec.population // 2, model.param_count(spec.shape), block_sizes(spec.shape)
    lines = ["| tokens per member T | var(d) (1/16 bits)^2 | signal share rho | rho / T | "
             "vote signal energy per step, P rho / n | steps for signal = noise |",
             "|---|---|---|---|---|---|"]
    for length, blocks in result.items():
        a = blocks["all"]
        per_step = pairs * a["rho"] / n_weights
        steps = f"{1 / per_step:,.0f}" if per_step > 0 else "-"
        lines.append(f"| {length} | {a['var']:,.0f} | {a['rho']:.4f} +- {a['rho_se']:.4f} | "
                     f"{a['rho'] / length:.5f} | {per_step:.5f} | {steps} |")
    for length, blocks in result.items():
        aggs = blocks.get("aggregations")
        if not aggs:
            continue
        base = aggs["sum"]["cross"]
        lines += ["", f"Robust statistics of a pair's per-token differences at T = {length} (own signal share, and "
                      f"the correlation with the plain sum on the other texts; useful gain = (that / the sum's)^2):", "",
                  "| statistic | own signal share | corr with the sum's signal | useful gain |", "|---|---|---|---|"]
        for name, a in aggs.items():
            gain = (a["cross"] / base) ** 2 if base > 0 else float("nan")
            lines.append(f"| {name} | {a['rho']:.4f} +- {a['rho_se']:.4f} | {a['cross']:.4f} +- {a['cross_se']:.4f} "
                         f"| {gain:.2f} |")
    for length, blocks in result.items():
        parts = {k: v for k, v in blocks.items() if k not in ("all", "aggregations")}
        if not parts:
            continue
        total = sum(v["var"] for v in parts.values())
        lines += ["", f"Blocks at T = {length} (one block perturbed at a time; the sum of their variances is "
                      f"{total / blocks['all']['var']:.2f} x the whole model's):", "",
                  "| block | weights | share of var(d) | signal share rho_k |", "|---|---|---|---|"]
        for name, v in parts.items():
            lines.append(f"| {name} | {sizes[name]:,} | {v['var'] / total:.2f} | {v['rho']:.4f} +- {v['rho_se']:.4f} |")
        bound = sigma_bound([v["var"] for v in parts.values()], [v["rho"] for v in parts.values()])
        lines.append(f"\nPer-block sigma bound: the best noise scale per block would raise the vote's "
                     f"signal-to-noise ratio at most {bound:.3f}x.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tinyshakespeare.toml", help="TOML config (path or name)")
    parser.add_argument("--checkpoint", help="a run directory or exported model: measure at its weights "
                                             "(default: the config's seeded initial weights)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: its latest)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per member T (default: the config's)")
    parser.add_argument("--draws", type=int, default=32, help="noise draws, each on two sets of texts (default 32)")
    parser.add_argument("--warmup", type=int, default=64, help="tokens that build each text's state (default 64)")
    parser.add_argument("--blocks", action="store_true", help="also perturb one block at a time")
    parser.add_argument("--aggregations", action="store_true",
                        help="also rate robust statistics of the per-token differences (clipped, sign)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the texts and the noise")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")

    def body(args, cfg):
        if args.draws < 2:
            raise UserError("--draws must be >= 2 (the standard error needs two)")
        params = None
        if args.checkpoint:
            loaded = checkpoint.load_model(args.checkpoint, args.step)
            cfg = config.apply_values(cfg, {"model": dataclasses.asdict(loaded.config.model)}, "the checkpoint")
            params = jax.tree_util.tree_map(jnp.asarray, loaded.params)
        tokenizer = data.make_tokenizer(cfg.data)
        cfg = trainer.resolve_model_config(cfg, tokenizer)
        spec = common.make_spec(cfg)
        if spec.group_size != 2:
            raise UserError("noise_budget.py measures pairs that share a text: use es.group_size = 2")
        shape = spec.shape
        if params is None:
            params = model.init_params(shape, cfg.train.seed)
        corpus = data.load_corpus(cfg.data, tokenizer, progress=False)
        lengths = args.tokens or [cfg.es.tokens_per_update]
        n_weights = model.param_count(shape)
        print(f"noise budget: {shape.layers} x {shape.width} model ({n_weights:,} weights), "
              f"{spec.population // 2} pairs, sigma 2^-{spec.sigma_shift}, {args.draws} draws"
              + (f", checkpoint {args.checkpoint} step {loaded.step}" if args.checkpoint else ", initial weights"),
              flush=True)
        texts = Texts(corpus.split("train").tokens, shape, args.warmup, args.seed)
        result = measure(spec, params, texts, lengths, args.draws, args.blocks, args.seed, args.aggregations,
                         log=lambda s: print(s, flush=True))
        print()
        print(report(result, spec))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"weights": n_weights, "pairs": spec.population // 2, "sigma_shift": spec.sigma_shift,
                           "step": int(loaded.step) if args.checkpoint else 0, "block_sizes": block_sizes(shape),
                           "machine": common.machine(),
                           "by_tokens": {str(k): v for k, v in result.items()}}, f, indent=1)
        return 0

    return run_main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
