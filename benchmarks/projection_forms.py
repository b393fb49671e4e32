#!/usr/bin/env python
"""The engine's projection forms on a decode step's row counts, and two engines that differ only in the form.

1. Forms: every projection of the embedded model (each layer's fused qkv, o, gate_up and down, and the
   head: 23 MB of fp32 weights) multiplied by 1, 2, 4 and 16 rows in each form `projection.py` offers here
   ("linear" is `F.linear`, the BLAS call), rounds alternating between forms; the median time of a pass
   over all the weights. One thread unless --threads.
2. Engines (--engines): an engine on "linear" and one on "panels", side by side in this process, each
   decoding one stream (alpha) and then a pair (alpha and beta, two random r=8 all-linear adapters) of 256
   greedy tokens, rounds alternating; tokens/s of each and pair ÷ single. Both engines must give the same
   tokens.

    python benchmarks/projection_forms.py [--threads 1] [--repeats 200] [--engines] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit.engine.runner as runner_module
from lorakit.engine.engine import Engine, EngineConfig
from lorakit.engine.layout import DecoderLayout, fuse_group_weights
from lorakit.engine.projection import FORMS, Projection, form_available
from lorakit.engine.sampling import SamplingParams
from lorakit.models import load_model
from playground import save_adapter  # this folder's benchmark: two random r=8 all-linear adapters

ROWS = (1, 2, 4, 16)
PROMPT = "To be, or not to be, that is the question:"


def model_weights() -> list[torch.Tensor]:
    model = load_model(None)
    fused = fuse_group_weights(model, DecoderLayout(model))
    return [group.weight.detach() for groups in fused for group in groups.values()] + [model.lm_head.weight.detach()]


def time_forms(weights: list[torch.Tensor], repeats: int) -> None:
    forms = [form for form in FORMS if all(form_available(form, w) for w in weights)]
    print(f"forms: {sum(w.numel() for w in weights) * 4 / 1e6:.1f} MB of fp32 weights, {len(weights)} projections, "
          f"{torch.get_num_threads()} thread(s); median ms of a pass over all of them")
    print(f"{'rows':>5} " + " ".join(f"{form:>8}" for form in forms))
    for rows in ROWS:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        projections = {form: [Projection(w, None, form) for w in weights] for form in forms}
        times = {form: [] for form in forms}
        for round_ in range(repeats + 1):
            for form in forms if round_ % 2 else reversed(forms):
                start = time.perf_counter()
                for projection, weight in zip(projections[form], weights):
                    projection(inputs[weight.shape[1]])
                if round_:
                    times[form].append(time.perf_counter() - start)
        print(f"{rows:>5} " + " ".join(f"{statistics.median(times[form]) * 1e3:8.3f}" for form in forms))


def compare_engines(rounds: int, threads: int) -> None:
    forms = [form for form in ("linear", "panels") if form_available(form, torch.zeros(1, 1))]
    chosen = runner_module.choose_form
    engines = {}
    with tempfile.TemporaryDirectory() as folder:
        alpha, beta = save_adapter(Path(folder) / "alpha", 0), save_adapter(Path(folder) / "beta", 1)
        for form in forms:
            runner_module.choose_form = lambda weights, form=form: form
            engine = Engine(EngineConfig(threads=threads), own_process=True)
            engine.add_adapter("alpha", alpha)
            engine.add_adapter("beta", beta)
            engines[form] = engine
    runner_module.choose_form = chosen
    ids = engines[forms[0]].tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=256, temperature=0, seed=0, ignore_eos=True)

    def decode(engine: Engine, names: list[str]) -> tuple[float, list]:
        handles = [engine.submit(ids, params, name) for name in names]
        start = time.perf_counter()
        engine.run_until_idle()
        elapsed = time.perf_counter() - start
        return 256 * len(names) / elapsed, [handle.result().token_ids for handle in handles]

    rates = {form: {"single": [], "pair": []} for form in forms}
    tokens = {}
    for round_ in range(rounds):
        for form in forms if round_ % 2 else reversed(forms):
            for kind, names in (("single", ["alpha"]), ("pair", ["alpha", "beta"])):
                rate, outputs = decode(engines[form], names)
                rates[form][kind].append(rate)
                tokens.setdefault((form, kind), outputs)
    same = all(tokens[(form, kind)] == tokens[(forms[0], kind)] for form in forms for kind in ("single", "pair"))
    print(f"\nengines: {rounds} alternating rounds, one stream and a pair of 256 tokens, {threads} thread(s); "
          f"same tokens in every form: {same}")
    for form in forms:
        single, pair = (statistics.median(rates[form][kind]) for kind in ("single", "pair"))
        ratios = [p / s for s, p in zip(rates[form]["single"], rates[form]["pair"])]
        print(f"{form:>8}: single {single:6.1f} tok/s  pair {pair:6.1f} tok/s  pair / single {pair / single:.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")
    if not same:
        raise SystemExit("the forms gave different tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--engines", action="store_true", help="also decode with an engine per form")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print("command: python benchmarks/projection_forms.py " + " ".join(sys.argv[1:]))
    torch.set_num_threads(args.threads)
    time_forms(model_weights(), args.repeats)
    if args.engines:
        compare_engines(args.rounds, args.threads)


if __name__ == "__main__":
    main()
