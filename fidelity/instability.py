"""``python -m fidelity.instability``: where FP16 breaks, and the least FP32 that mends it.

    python -m fidelity.instability trace  --models M --backends B --precisions P [--out DIR]
        every block's min cosine / max error / non-finite values against FP32, on the
        natural-text and seeded inputs: the first non-finite block, the first block below the bar
    python -m fidelity.instability nan-rates --models M --backends B --precisions fp16,hybrid [--samples N]
        the share of samples with a non-finite output (and block output) per input source, with 95%
        intervals, and whether natural text overflows more often than random tokens (fidelity.nan_rates)
    python -m fidelity.instability downstream --models M --backends B --precisions fp16,hybrid [--sst2 FILE]
        what a precision changes downstream (fidelity.downstream): label agreement of a seeded head,
        nearest-neighbour agreement and similarity rank correlation (BERT family), next-token agreement
        and KL (GPT-2), on SST-2 sentences (a file, datasets' glue/sst2, else the sample shipped here)
    python -m fidelity.instability activations --models M [--weights stress]
        the outlier statistics of the FP32 model (per block: the top-3 dims of |residual| with value and
        position, the median, the FFN output's top-1) on natural text and random tokens, beside the
        published statistics a stress recipe is calibrated to (engines.stress)
    python -m fidelity.instability summary DIR
        DIR/summary.md: one set of tables over every <model>-<weights>/ result folder in DIR
        (fidelity.instability_report), generated from their JSON
    python -m fidelity.instability search --models M --backends B --start fp16 --out DIR
        the smallest FP32-keep policy (fidelity.policy_search): DIR/policy.json (a policy
        file every backend takes: --precisions file:DIR/policy.json), DIR/search.json, DIR/search.md

Engine options are the tests' (models, backends, device, weights, engine cache, ...).
Inputs: the profile's natural-text batches (``--wikitext-path``, else the bundled prose),
``--random-batches`` seeded uniform-random token batches of the same shapes and, for trace and
search, ``--hypothesis-samples`` samples of the fidelity tests' Hypothesis strategies (padding,
special tokens, any length): a policy found without them passed text and random ids on the H100
and failed the Hypothesis inputs of ``pytest -m fidelity``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from engines.batch import TokenBatch
from engines.files import atomic_write_json, atomic_write_text
from engines.options import (
    ENGINE_OPTIONS,
    EngineSelection,
    OptionError,
    add_options,
    check_creatable,
    collect,
    usage_errors,
)
from engines.tables import render_table
from fidelity.metrics import PUBLISHED_COSINE_MIN

SEED = 20261126
DEFAULT_SHAPES = ((4, 64), (2, 128))


def inputs_for(model, *, wikitext_path: Path | None, random_batches: int, shapes=DEFAULT_SHAPES,
               hypothesis_samples: int = 0) -> list[TokenBatch]:
    """Natural-text batches (packed and padded per shape), seeded random ones, and the suite's Hypothesis strategies'
    batches (derandomized: the same every run), as the fidelity tests draw them."""
    from fidelity.corpus import load_corpus, packed_batch, padded_batch
    from fidelity.nan_rates import hypothesis_batches

    batches: list[TokenBatch] = []
    if model.tokenizer is not None:
        corpus = load_corpus(wikitext_path)[0]
        for batch, seq in shapes:
            seq = min(seq, model.max_positions)
            batches += [packed_batch(corpus, model, batch=batch, seq_len=seq),
                        padded_batch(corpus, model, batch=batch, seq_len=seq)]
    generator = torch.Generator().manual_seed(SEED)
    for index in range(random_batches):
        batch, seq = shapes[index % len(shapes)]
        ids = torch.randint(0, model.vocab_size, (batch, min(seq, model.max_positions)), generator=generator)
        batches.append(TokenBatch(ids, torch.ones_like(ids), f"seeded random ids #{index} (seed {SEED})"))
    if hypothesis_samples:
        longest = min(max(seq for _, seq in shapes), model.max_positions)
        batches += hypothesis_batches(model, samples=hypothesis_samples, max_seq=longest)
    return batches


def _some(inputs: list[TokenBatch], model) -> list[TokenBatch]:
    if not inputs:
        raise OptionError(f"no inputs: {model.name} has no tokenizer here (no natural text) and --random-batches and "
                          "--hypothesis-samples are 0; give one of them a count")
    return inputs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fidelity.instability", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", required=True)
    # One engine at a time: the engine options without the ones that choose several or spread them over workers.
    options = tuple(o for o in ENGINE_OPTIONS if o.dest != "gpus")
    for name, text in (("trace", "block-by-block divergence from FP32"), ("search", "the smallest FP32-keep policy"),
                       ("nan-rates", "non-finite rates by input source"),
                       ("activations", "outlier statistics of the FP32 model, beside the published ones"),
                       ("downstream", "agreement of what the output is used for, engine against FP32")):
        p = sub.add_parser(name, help=text)
        add_options(p.add_argument, tuple(o for o in options if name != "search" or o.dest != "precisions"))
        p.add_argument("--wikitext-path", type=Path,
                       help="WikiText-2 (parquet, json/jsonl or raw text, as the tests take it); default: the bundled prose")
        p.add_argument("--random-batches", type=int, default=2, help="seeded uniform-random token batches (default 2)")
        if name in ("trace", "search"):
            p.add_argument("--hypothesis-samples", type=int, default=32,
                           help="up to this many samples drawn from the fidelity tests' Hypothesis strategies "
                                "(derandomized; default 32)")
        p.add_argument("--out", type=Path, help="folder for the results (JSON and Markdown)")
        p.add_argument("--cosine-min", type=float, default=None if name == "nan-rates" else PUBLISHED_COSINE_MIN,
                       help="the bar (default: each precision's own, as the fidelity tests hold it)" if name == "nan-rates"
                       else f"the bar (default {PUBLISHED_COSINE_MIN}, the published one)")
    summary = sub.add_parser("summary", help="one summary over a folder of results")
    summary.add_argument("folder", type=Path, help="the folder holding <model>-<weights>/ result folders")
    rates = sub.choices["nan-rates"]
    rates.add_argument("--samples", type=int, default=64, help="samples (rows) per input source (default 64)")
    rates.add_argument("--seq-len", type=int, default=128, help="sequence length of the random and text inputs (default 128)")
    sub.choices["downstream"].add_argument("--sst2", type=Path,
                                           help="SST-2 sentences: GLUE's TSV or a parquet with sentence and label "
                                                "(default: datasets' glue/sst2 where reachable, else the shipped sample)")
    sub.choices["downstream"].add_argument("--classifier", action="store_true",
                                           help="the model's --model-path DIR is a fine-tuned SST-2 "
                                                "BertForSequenceClassification: report accuracy with its own head")
    search = sub.choices["search"]
    search.add_argument("--start", default="fp16", help="the low-precision policy to start from (default fp16)")
    search.add_argument("--margin", type=float, default=2.0,
                        help="pass means 1 - cosine <= (1 - bar) / margin (default 2: half the error budget)")
    return parser


def _selection(args: argparse.Namespace, precisions: str, *, precisions_flag: str) -> EngineSelection:
    values = collect(vars(args).get, ENGINE_OPTIONS)
    if values.get("models") and not values.get("backends") and vars(args).get("command") == "activations":
        values["backends"] = "torch"  # the FP32 model itself is profiled: no engine is built
    if not values.get("models") or not values.get("backends"):
        raise OptionError("give one model (--models NAME) and one backend (--backends NAME): a search or trace "
                          "looks at one engine")
    values["precisions"] = precisions
    try:
        selection = EngineSelection.from_values(values)
    except OptionError as exc:
        if "unknown precision" in str(exc) and precisions_flag != "--precisions":
            known = str(exc).split(" Pass them with")[0]
            raise OptionError(f"{precisions_flag} {precisions}: {known}") from None
        raise
    if len(selection.models) != 1 or len(selection.backends) != 1:
        raise OptionError("give one model (--models) and one backend (--backends) per search or trace")
    return selection


def _check(args: argparse.Namespace) -> None:
    """Every value checked before anything is built or measured."""
    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise OptionError(f"--out {args.out} is a file; give a folder (it is created if missing)")
        if not args.out.exists():
            check_creatable(args.out, source="--out", fix="give a folder that can be created")
    if args.random_batches < 0 or vars(args).get("hypothesis_samples", 0) < 0:
        raise OptionError("--random-batches and --hypothesis-samples must be >= 0")
    if args.cosine_min is not None and not 0 < args.cosine_min < 1:
        raise OptionError(f"--cosine-min {args.cosine_min}: give a cosine bar between 0 and 1, such as 0.9998")
    if args.command == "nan-rates" and (args.samples < 1 or args.seq_len < 2):
        raise OptionError("--samples must be >= 1 and --seq-len >= 2")
    if args.command == "search":
        if args.out is None:
            raise OptionError("--out DIR is required: the found policy file and the search report go there")
        if args.margin < 1:
            raise OptionError(f"--margin {args.margin}: give 1 or more (2: pass at half the bar's error budget)")
    if args.command == "downstream" and args.sst2 is not None:
        from fidelity.downstream import load_sst2_file

        load_sst2_file(args.sst2)  # refused now, not after the engines are built
    if args.wikitext_path is not None:
        from fidelity.corpus import load_corpus

        load_corpus(args.wikitext_path)  # a missing or unreadable file is refused now


def _open(selection):
    """The factory (numerics applied), the one model's name, the one backend and the loaded model."""
    from engines.factory import EngineFactory

    factory = EngineFactory(selection)
    factory.check_perturbations()
    factory.apply_numerics()
    model_name, backend = selection.models[0], selection.backends[0]
    return factory, model_name, backend, factory.model(model_name)


def _write(args, name: str, results, text: str) -> None:
    """Print the Markdown; with --out, write it and the JSON as NAME.md and NAME.json."""
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / f"{name}.json", results, default=str)
        atomic_write_text(args.out / f"{name}.md", text)


def _trace(args, selection) -> int:
    from engines.factory import EngineSpec
    from fidelity.divergence import trace

    factory, model_name, backend, model = _open(selection)
    inputs = _some(inputs_for(model, wikitext_path=args.wikitext_path, random_batches=args.random_batches,
                              hypothesis_samples=args.hypothesis_samples), model)
    reference = factory.reference(model_name)
    results, lines = [], [f"# Divergence from FP32: {model_name} / {backend} ({model.weights_source})", ""]
    for precision in selection.precisions:
        engine = factory.build(EngineSpec(model_name, backend, precision))
        for batch in inputs:
            found = trace(engine, reference, batch, bar=args.cosine_min)
            if found is None:
                raise OptionError(f"backend {backend} exposes no block outputs: trace a torch engine "
                                  "(torch, torch-cudagraph or torch-compile run the same module eagerly for it)")
            results.append({"engine": engine.name, "input": batch.source, "shape": list(batch.shape),
                            "first_nonfinite": found.first_nonfinite and found.first_nonfinite.name,
                            "first_below_bar": found.first_below_bar and found.first_below_bar.name,
                            "blocks": [dict(zip(("block", "min_cosine", "max_abs_err", "nonfinite"), row))
                                       for row in found.table()]})
            lines += [f"## {engine.name}, {batch.source} {tuple(batch.shape)}", "", found.compact(), "",
                      render_table(("block", "min cosine", "max abs err", "non-finite"), found.table(), markdown=True), ""]
        engine.close()
    _write(args, "trace", results, "\n".join(lines))
    factory.close()
    return 0


def _nan_rates(args, selection) -> int:
    from engines.factory import EngineSpec
    from fidelity import nan_rates as nr
    from fidelity.corpus import load_corpus

    factory, model_name, backend, model = _open(selection)
    seq = min(args.seq_len, model.max_positions)
    sources = {
        "random": nr.random_batches(model, samples=args.samples, seq_len=seq, seed=SEED),
        "hypothesis": nr.hypothesis_batches(model, samples=args.samples, max_seq=seq),
    }
    if model.tokenizer is not None:
        sources["text"] = nr.text_batches(model, load_corpus(args.wikitext_path)[0], samples=args.samples, seq_len=seq)
    for kind in ("stress-padding", "stress-repeat", "stress-max"):
        sources[kind] = nr.stress_batches(model, kind, samples=max(4, args.samples // 4), seq_len=seq, seed=SEED)
    reference = factory.reference(model_name)
    references = {name: [reference.infer(batch).cpu() for batch in batches] for name, batches in sources.items()}
    control = {name: nr.nonfinite_samples(outputs, batches) for (name, batches), outputs
               in zip(sources.items(), references.values())}
    results, rows, verdicts = [], [], []
    from fidelity.metrics import tolerance_for

    for precision in selection.precisions:
        engine = factory.build(EngineSpec(model_name, backend, precision))
        bar = tolerance_for(engine.policy, args.cosine_min).cosine_min  # --cosine-min, else the precision's own
        rates = {name: nr.measure(engine, batches, name, reference_nonfinite=control[name],
                                  references=references[name], bar=bar)
                 for name, batches in sources.items()}
        engine.close()
        for rate in rates.values():
            low, high = rate.interval()
            results.append({"engine": engine.name, "weights": model.weights_source, **dataclasses.asdict(rate),
                            "rate": rate.rate, "ci95": [low, high], "bar": bar})
            rows.append((f"{engine.name} (bar {bar:g})", rate.source, rate.samples,
                         f"{rate.nonfinite_output} ({rate.rate:.1%})",
                         f"{low:.1%}-{high:.1%}", "-" if rate.nonfinite_intermediate is None else rate.nonfinite_intermediate,
                         f"{rate.below_bar} ({rate.below_bar / rate.samples:.1%})", rate.reference_nonfinite))
        if "text" in rates:
            for what, of, key in (("non-finite", "nonfinite_output", "ratio_text_over_random"),
                                  ("below the bar", "below_bar", "below_bar_ratio_text_over_random")):
                r = nr.ratio(rates["text"], rates["random"], of=of)
                verdicts.append((engine.name, what, f"{r.ratio:.2f}" if r.ratio == r.ratio else "-",
                                 f"{r.low:.2f}-{r.high:.2f}", r.verdict))
                results.append({"engine": engine.name, "weights": model.weights_source, key: dataclasses.asdict(r)})
    lines = [f"# Non-finite rates by input source: {model_name} / {backend} ({model.weights_source})", "",
             "Share of samples with any NaN/Inf output at a valid position (Wilson 95% interval), samples with a "
             "non-finite block output, samples whose cosine against FP32 is below the bar (or not finite; "
             + (f"--cosine-min {args.cosine_min}" if args.cosine_min is not None else "each precision's own bar, as "
                "the fidelity tests hold it") + "), "
             "and the FP32 reference's non-finite count (the control).", "",
             render_table(("engine", "source", "samples", "non-finite outputs", "95% interval", "non-finite blocks",
                           "below the bar", "FP32 reference"), rows, markdown=True), ""]
    if verdicts:
        lines += ["Natural text / random tokens, rate ratio (95% interval, Katz) of non-finite samples and of samples "
                  "below the bar: 'random inputs underestimate FP16 NaN rates' is reproduced above 1, refuted below 1.",
                  "",
                  render_table(("engine", "failure", "ratio", "95% interval", "verdict"), verdicts, markdown=True), ""]
    else:
        lines += [f"No natural-text source: {model_name} has no tokenizer here, so the text/random ratio is not measured.", ""]
    _write(args, "nan_rates", results, "\n".join(lines))
    factory.close()
    return 0


def _downstream(args, selection) -> int:
    from engines.factory import EngineSpec
    from fidelity import downstream as ds

    head = None
    if args.classifier:  # checked before anything is built
        folder = selection.model_paths.get(selection.models[0])
        if folder is None:
            raise OptionError(f"--classifier scores the fine-tuned checkpoint of {selection.models[0]}: give it as "
                              f"--model-path {selection.models[0]}=DIR")
        head = ds.ClassifierHead.load(folder)
    factory, model_name, backend, model = _open(selection)
    if head is not None and model.spec.causal:
        raise OptionError(f"--classifier takes a BERT-family sequence classifier, not {model_name}")
    sentences, note = ds.load_sst2(args.sst2)
    batch = ds.encode(model, sentences.texts)
    reference_output = factory.reference(model_name).infer(batch)  # once, for every precision
    text = None
    trained = not (model.is_random_init or model.weights_source.startswith("stress"))
    if model.spec.causal and trained:  # perplexity on natural text, with the weights a checkpoint brought
        from fidelity.corpus import load_corpus, packed_batch

        text = packed_batch(load_corpus(args.wikitext_path)[0], model, batch=8, seq_len=min(256, model.max_positions))
        text_reference = factory.reference(model_name).infer(text)
    found = []
    for precision in selection.precisions:
        engine = factory.build(EngineSpec(model_name, backend, precision))
        output = engine.infer(batch)  # once, for the agreement and the accuracy
        measured = ds.agreement(engine, reference_output, batch, causal=model.spec.causal, output=output)
        if head is not None:
            measured = dataclasses.replace(measured, accuracy=head.accuracy(output, sentences.labels))
        if text is not None:
            measured = dataclasses.replace(measured, perplexity=ds.perplexity(engine.infer(text), text))
        found.append(measured)
        engine.close()

    def fmt(value):
        return "-" if value is None else f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"

    fp32 = {"accuracy": head.accuracy(reference_output, sentences.labels) if head is not None else None,
            "perplexity": ds.perplexity(text_reference, text) if text is not None else None}
    rows = [(a.engine, fmt(a.label_agreement), fmt(a.nearest_neighbour_agreement), fmt(a.similarity_spearman),
             fmt(a.next_token_agreement), fmt(a.mean_kl), fmt(a.accuracy), fmt(a.perplexity)) for a in found]
    rows.append((f"{model_name} FP32 reference", "-", "-", "-", "-", "-", fmt(fp32["accuracy"]), fmt(fp32["perplexity"])))
    why = []
    if head is None:
        why.append("no accuracy: give a fine-tuned SST-2 classifier as --model-path NAME=DIR with --classifier")
    if model.spec.causal and text is None:
        why.append(f"no perplexity: {model.weights_source} weights are not a trained model's, so their perplexity says "
                   "nothing about the language; next-token agreement and KL against FP32 are the measures")
    text_md = "\n".join([
        f"# Downstream agreement with FP32: {model_name} / {backend} ({model.weights_source})", "",
        f"{len(sentences.texts)} sentences: {note}. Label agreement: a seeded two-class linear head on the mean-pooled "
        "output, engine against FP32 (decision flips). Accuracy: the fine-tuned classifier's own head against the gold "
        "labels. Perplexity: natural text, 8 x 256 tokens.", "",
        render_table(("engine", "label agreement", "nearest-neighbour agreement", "similarity Spearman",
                      "next-token agreement", "mean KL", "accuracy", "perplexity"), rows, markdown=True), "",
        *(f"- {line}" for line in why), ""])
    _write(args, "downstream", {"sentences": sentences.name, "note": note, "weights": model.weights_source,
                                "fp32": fp32, "classifier": head.source if head is not None else None,
                                "agreement": [dataclasses.asdict(a) for a in found], "not_measured": why}, text_md)
    factory.close()
    return 0


def _activations(args, selection) -> int:
    from engines.stress import RECIPES, activation_profile, compare_with_published

    factory, model_name, _, model = _open(selection)
    inputs = inputs_for(model, wikitext_path=args.wikitext_path, random_batches=max(1, args.random_batches),
                        shapes=((4, 128),))
    inputs = [b for b in inputs if "padded" not in b.source]  # packed text and random ids: every position valid
    results = {"model": model_name, "weights": model.weights_source, "inputs": [], "published": []}
    lines = [f"# Outlier statistics of the FP32 model: {model_name} ({model.weights_source})", "",
             "Per block output (the residual stream): the three dims with the largest |x| over valid positions "
             "(value, dim @ position), the median |x|, and the FFN output's largest |x|.", ""]
    for batch in inputs:
        profile = activation_profile(model.module, batch.input_ids, batch.attention_mask)
        results["inputs"].append({"input": batch.source, "shape": list(batch.shape), "blocks": profile})
        rows = [(r["layer"], *(f"{e['value']:.4g} ({e['dim']} @ {e['position']})" for e in r["top"]),
                 f"{r['median']:.3g}", f"{r['ffn_top1']:.4g}") for r in profile]
        lines += [f"## {batch.source} {tuple(batch.shape)}", "",
                  render_table(("block", "top-1", "top-2", "top-3", "median", "FFN top-1"), rows, markdown=True), ""]
    recipe = RECIPES.get(model_name)
    if recipe is not None:
        compared = compare_with_published(recipe, results["inputs"][0]["blocks"])
        results["published"] = compared
        results["recipe"] = recipe.describe()
        rows = [(c["quantity"], c["layer"] if c["layer"] >= 0 else "all", f"{c['published']:.4g}",
                 f"{c['planted']:.4g}", f"{c['ratio']:.3g}", c["status"]) for c in compared]
        lines += [f"## This model beside the published statistics ({results['inputs'][0]['input']})", "",
                  "Status: paper (read in the paper), secondary (a reproduction of the paper's code), assumed (the "
                  "published value could not be read here). Sources: " + "; ".join(recipe.sources), "",
                  render_table(("quantity", "block", "published", "this model", "ratio", "status"), rows,
                               markdown=True), "",
                  "Assumptions of the stress recipe: " + "; ".join(recipe.assumptions), ""]
    _write(args, "activations", results, "\n".join(lines))
    factory.close()
    return 0


def _search(args, selection) -> int:
    from engines.backends.registry import get_backend
    from engines.precision.policy import write_policy_file
    from fidelity.policy_search import PolicySearch

    factory, model_name, backend, model = _open(selection)
    start = factory.policy(selection.precisions[0])
    runner_cls = get_backend(backend).load()
    inputs = _some(inputs_for(model, wikitext_path=args.wikitext_path, random_batches=args.random_batches,
                              hypothesis_samples=args.hypothesis_samples), model)
    time_engine = None
    if factory.device.startswith("cuda"):
        from perf.stats import median
        from perf.timing import TimedEngine, sample_seconds, staged_inputs

        def time_engine(runner, batch):
            call = TimedEngine(runner, staged_inputs(runner, *batch.shape))
            return 1e3 * median(sample_seconds(call, warmup=5, rounds=20))

    print(f"search: {model_name} ({model.weights_source}) / {backend} from {start.name}: {len(inputs)} input batches; "
          f"pass: 1 - min cosine <= (1 - {args.cosine_min}) / {args.margin}, no non-finite output", flush=True)
    search = PolicySearch(model, start, lambda policy: runner_cls(model, policy, factory.device, factory.options).build(),
                          factory.reference(model_name), inputs, bar=args.cosine_min, margin=args.margin,
                          time_engine=time_engine)
    result = search.run()
    hybrid = factory.policy("hybrid")  # the published policy, judged and timed as the candidates were
    search.evaluate("published hybrid", hybrid)
    args.out.mkdir(parents=True, exist_ok=True)
    policy_path = write_policy_file(result.policy, args.out / "policy.json")
    record = {**result.as_dict(), "model": model_name, "weights": model.weights_source, "backend": backend,
              "device": factory.device, "inputs": [b.source for b in inputs], "environment": factory.environment(),
              "command": "python -m fidelity.instability " + " ".join(sys.argv[1:])}
    rows = [(i + 1, c.stage, "softmax, layernorm, elementwise (every module)" if c.stage == "published hybrid"
             else ", ".join(k.describe() for k in c.keeps) or "nothing", f"{c.min_cosine:.7f}", c.nonfinite,
             "pass" if c.passed else "fail", "-" if c.latency_ms is None else f"{c.latency_ms:.3f}")
            for i, c in enumerate(result.path)]
    text = "\n".join([
        f"# Smallest FP32-keep policy: {model_name} / {backend} from {start.name}", "",
        f"Weights: {model.weights_source}; device {factory.device}; {len(inputs)} input batches; pass: no non-finite "
        f"output and every sample's cosine >= {result.threshold:.7g} (bar {args.cosine_min}, margin {args.margin:g}).",
        "Algorithm: delta debugging (ddmin, 1-minimal): the op classes, then each kept class's modules.", "",
        f"Kept in FP32: **{', '.join(k.describe() for k in result.keeps) or 'nothing'}** -> `{policy_path.name}`",
        "(the published hybrid policy keeps softmax, layernorm and elementwise in FP32 everywhere: its row, last, is "
        "judged and timed as the candidates were).", "",
        render_table(("#", "stage", "kept in FP32", "min cosine", "non-finite", "verdict", "latency ms"), rows,
                     markdown=True), ""])
    _write(args, "search", record, text)
    factory.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from fidelity.corpus import CorpusError
    from fidelity.downstream import DownstreamDataError

    if args.command == "summary":
        from fidelity.instability_report import summarize

        try:
            text = summarize(args.folder)
        except (FileNotFoundError, NotADirectoryError) as exc:
            parser.error(str(exc))
        except (ValueError, KeyError, TypeError) as exc:  # a damaged or foreign JSON file in the folder
            parser.error(f"{args.folder}: a result file is not what the instability commands write "
                         f"({type(exc).__name__}: {exc}); rerun the command that wrote it")
        atomic_write_text(args.folder / "summary.md", text)
        print(text)
        return 0
    try:
        _check(args)
        if args.command == "search":
            selection = _selection(args, args.start, precisions_flag="--start")
        else:
            selection = _selection(args, vars(args).get("precisions") or "fp16", precisions_flag="--precisions")
        return {"trace": _trace, "search": _search, "nan-rates": _nan_rates, "downstream": _downstream,
                "activations": _activations}[args.command](
            args, selection)
    except (*usage_errors(), CorpusError, DownstreamDataError) as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
