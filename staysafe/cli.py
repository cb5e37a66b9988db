"""The ``staysafe`` command: train, runs, models, align, fit-probe, compare-risk, experiment, safelora, queue,
validate-judges."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from staysafe.errors import StaySafeError
from staysafe.judges.endpoint import add_endpoint_arguments, endpoint_for, endpoint_from_args
from staysafe.options import (
    ALIGNED,
    DEFAULT_RESPONSE_JUDGE,
    DEFENSES,
    POSITIONS,
    RESPONSE_JUDGES,
    ExperimentSpec,
    RunSpec,
    SpecError,
    default_of,
    flag,
    help_text,
)
from staysafe.runs.files import TraceError, read_json


def add_spec_arguments(p: argparse.ArgumentParser, schema=RunSpec) -> None:
    """One flag per field of ``schema`` (RunSpec: ``staysafe train``; ExperimentSpec: ``staysafe experiment``),
    its help from the field's metadata: the CLI, job files and config.json can never disagree. Choices are not
    enforced by argparse, so that a bad value gets the same message as from a file."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if "help" not in f.metadata:
            continue
        default = default_of(f)
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        if isinstance(default, bool):
            p.add_argument(flag(f.name, f), action=argparse.BooleanOptionalAction, default=default, help=help_text(f))
        elif isinstance(default, list) or typing.get_origin(kind) is list:
            p.add_argument(flag(f.name, f), type=lambda s: [x for x in s.split(",") if x], default=default,
                           help=help_text(f))
        else:
            if f.name == "runs_dir":
                default = None  # $STAYSAFE_RUNS, else ./runs (schema_from_args)
            p.add_argument(flag(f.name, f), type=kind if kind in (int, float) else str, default=default,
                           dest=f.name, help=help_text(f))


def schema_from_args(args, schema=RunSpec):
    """The options parsed by :func:`add_spec_arguments` as a ``schema`` instance."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(schema) if "help" in f.metadata}
    values["runs_dir"] = values["runs_dir"] or runs_root_default()
    return schema(**values)


def spec_from_args(args) -> RunSpec:
    spec = schema_from_args(args)
    if spec.data:
        spec.scenario = None
    return spec


def runs_root_default() -> str:
    """Every subcommand's --runs-dir default: $STAYSAFE_RUNS, else ./runs."""
    return os.environ.get("STAYSAFE_RUNS") or "runs"


def given_options(argv: list[str]) -> set[str]:
    """The RunSpec options typed on this command line (even when equal to their defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    add_spec_arguments(p)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    given, _ = p.parse_known_args(argv)
    return set(vars(given))


def read_config(path: str) -> dict:
    """A --config file as a dict of options; named errors for a missing or malformed file (the path was typed
    by the user, so a link is followed)."""
    try:
        return read_json(Path(path), follow_links=True)
    except TraceError as err:
        raise SpecError(f"--config: {err}") from None


def spec_from_cli(args, argv: list[str]) -> RunSpec:
    """The run's options: flags, over a --config file when given (flags typed on the command line win, even when
    they equal the default). Where the run goes (runs_dir, run_id) is never the file's: a run's own config.json
    starts a new run under this command line's --runs-dir."""
    spec = spec_from_args(args)
    if not args.config:
        return spec
    base = {k: v for k, v in read_config(args.config).items() if k not in ("runs_dir", "run_id")}
    given = given_options(argv)
    typed = {k: v for k, v in dataclasses.asdict(spec).items() if k in given or k == "runs_dir"}
    if "data" in typed and typed["data"]:
        base["scenario"] = None
    spec = RunSpec.from_dict({**base, **typed})
    endpoint_for(spec.validate(), endpoint_from_args(args), base, f"--config {args.config}")
    return spec


RESUME_FLAGS = {"threads"}  # the only run options --resume takes from the command line (how, not what, it trains)


def cmd_train(args) -> int:
    from staysafe.runner import run_training

    endpoint = endpoint_from_args(args)
    if args.resume:
        ignored = sorted(given_options(args.argv) - RESUME_FLAGS)
        if ignored:
            raise SpecError(f"--resume continues a run with its own options; it would ignore "
                            f"{', '.join(flag(n) for n in ignored)}: drop them (or start a new run with --config "
                            f"{Path(args.resume) / 'config.json'} and those flags)")
        run_dir = run_training(resume=args.resume, endpoint=endpoint)
    else:
        run_dir = run_training(spec_from_cli(args, args.argv), endpoint=endpoint)
    print(f"run finished: {run_dir}")
    return 0


def cmd_queue(args) -> int:
    """``staysafe queue list|pause|resume|cancel|work``: the launch queue of a runs root (see staysafe.queue)."""
    from staysafe.queue import LaunchError, Queue

    q = Queue(Path(args.runs_dir or runs_root_default()), args.experiments_dir)
    if args.action == "work":
        return q.work(poll=args.poll)
    if args.action in ("pause", "resume"):
        getattr(q, args.action)()
        print(f"queue of {q.root} {'paused' if q.paused else 'running'}")
        return 0
    if args.action == "list":
        for job in q.jobs():
            print(f"{job['id']:60} {job['state']:12} {job.get('error') or ''}")
        if q.paused:
            print("(paused)")
        return 0
    if not args.job_id:
        print("staysafe queue cancel: error: give the job id (see `staysafe queue list`)", file=sys.stderr)
        return 2
    try:
        print(q.cancel(args.job_id))
    except LaunchError as err:
        print(f"staysafe queue cancel: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_runs(args) -> int:
    from staysafe.runs.traces import list_runs

    root = args.runs_dir or runs_root_default()
    df = list_runs(Path(root))
    if df.empty:
        print(f"no runs under {root}")
        return 0
    cols = ["run_id", "state", "method", "risk", "scenario", "steps_done", "max_steps", "final_asr_keyword", "error"]
    print(df[cols].to_string(index=False))
    return 0


def cmd_models(args) -> int:
    from staysafe.models.loading import model_status
    from staysafe.runs.paths import staysafe_home

    print(f"cache: {staysafe_home()}")
    print(f"{'ready':6} {'model':30} detail")
    for row in model_status():
        print(f"{'yes' if row['ready'] else 'no':6} {row['name']:30} {row['detail']}")
    return 0


def cmd_align(args) -> int:
    from staysafe.models.align import AlignSettings, build_aligned

    settings = AlignSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             precision=args.precision, defense=args.defense, vaccine_rho=args.vaccine_rho)
    if args.export and args.defense != "none":
        raise SpecError("--export ships the default reference; a --defense build stays local")
    path = build_aligned(settings, force=args.force)
    if args.export:
        from staysafe.models.align import export_shipped

        print(f"shipped adapter written to {export_shipped(path)}")
    report = json.loads((path / "alignment.json").read_text())
    m = report["metrics"]
    print(f"aligned model: {path}")
    print(f"held-out harmful refused: {m['harmful_refusal_rate']:.1%}  benign refused: {m['benign_refusal_rate']:.1%}"
          f"  ({report['seconds'] / 60:.1f} min)")
    return 0


def cmd_fit_probe(args) -> int:
    from staysafe.models.loading import load_model
    from staysafe.probe import collect_activations, fit_probe, labelled_prompts

    model, tok = load_model(args.model)
    train = collect_activations(model, tok, labelled_prompts(args.train.split(",")), position=args.position)
    test = collect_activations(model, tok, labelled_prompts(args.test.split(",")), position=args.position)
    layer = None if args.layer is None else [int(x) for x in args.layer.split(",")]
    probe = fit_probe(train, held_out=test, layer=layer if layer is None or len(layer) > 1 else layer[0],
                      model=args.model)
    path = probe.save(Path(args.out))
    if args.save_activations:
        test.save(Path(args.out).parent / "activations")
    print("layer  val_auroc  test_auroc")
    for r in probe.metrics["sweep"]:
        print(f"{r['layer']:5d}  {r['val_auroc']:.3f}      {r.get('test_auroc', float('nan')):.3f}")
    print(f"chosen layers {probe.layers}: held-out {probe.metrics.get('test')}; saved {path}")
    return 0


def cmd_compare_risk(args) -> int:
    from staysafe.eval.compare import compare_risk

    summary = compare_risk(model=args.model, data=args.data.split(","), judges=args.judges.split(","),
                           out_dir=Path(args.out), probe_path=args.probe, threshold=args.threshold)
    print(json.dumps(summary, indent=2))
    return 0


def parse_overrides(items: list[str]) -> dict:
    """``OPTION=VALUE`` pairs (``--set``), parsed by the very flags of ``staysafe train`` (one typing of options)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_spec_arguments(parser)
    defaults, fields, out = RunSpec(), {f.name for f in dataclasses.fields(RunSpec)}, {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise SpecError(f"--set {item!r}: expected OPTION=VALUE with OPTION a train option (see staysafe train "
                            "--help)")
        flag = name.replace("_", "-")
        if isinstance(getattr(defaults, name), bool):
            switch = {"true": "", "1": "", "yes": "", "false": "no-", "0": "no-", "no": "no-"}.get(text.lower())
            if switch is None:
                raise SpecError(f"--set {item!r}: {name} expects true or false")
            argv = [f"--{switch}{flag}"]
        else:
            argv = [f"--{flag}={text}"]
        try:
            out[name] = getattr(parser.parse_args(argv), name)
        except argparse.ArgumentError as err:
            raise SpecError(f"--set {item!r}: {err}") from None
    return out


def parse_sweep(items: list[str]) -> dict:
    """``OPTION=V1,V2,...`` (``|`` separates values that hold commas themselves, e.g. token_betas), each value
    typed like ``--set``."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not text:
            raise SpecError(f"--sweep {item!r}: expected OPTION=V1,V2,... (e.g. beta=0.05,0.1,0.3)")
        values = text.split("|") if "|" in text else text.split(",")
        name = name.strip().replace("-", "_")
        out[name] = [parse_overrides([f"{name}={v.strip()}"])[name] for v in values]
    return out


def cmd_experiment(args) -> int:
    from staysafe.experiment import resume_experiment, run_experiment

    endpoint = endpoint_from_args(args)
    if args.resume:
        path = resume_experiment(args.out_dir, args.resume, args.runs_dir or runs_root_default(), endpoint=endpoint)
        print((path / "results.md").read_text())
        print(f"experiment written to {path}")
        return 0
    spec = dataclasses.replace(schema_from_args(args, ExperimentSpec), overrides=parse_overrides(args.set),
                               sweep=parse_sweep(args.sweep))
    path = run_experiment(spec, endpoint=endpoint)
    print((path / "results.md").read_text())
    print(f"experiment written to {path}")
    return 0


def cmd_safelora(args) -> int:
    from staysafe.defenses.safelora import safelora_run

    target = safelora_run(args.run_dir, threshold=args.threshold, layers=args.layers, unaligned=args.unaligned)
    print(f"projected run written to {target}")
    return 0


def cmd_validate_judges(args) -> int:
    from staysafe.eval.validation import build_judge, check_judge_names, load_validation_set, validate_judges
    from staysafe.runs.traces import write_json

    names = check_judge_names(args.judges)  # names and data are checked before any judge loads a model
    items = load_validation_set(args.data, args.split)
    judges = [build_judge(n, endpoint=endpoint_from_args(args), local_lm_model=args.local_lm_model) for n in names]
    report = validate_judges(judges, items, data=str(args.data), split=args.split)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    for name, r in report["judges"].items():
        a = r["attack_success"] or {}
        print(f"{name:20} kappa {a.get('kappa')}  accuracy {a.get('accuracy')}  ASR {a.get('asr_judge')} "
              f"(labelled {a.get('asr_labelled')})  {len(r['disagreements'])} disagreements")
    print(f"report written to {out}")
    return 0


def add_validate_judges(sub) -> None:
    from staysafe.eval.validation import DEFAULT_SET, SPLITS

    v = sub.add_parser("validate-judges", help="score labelled answers with each response judge; write a report")
    v.add_argument("--data", default=None, help=f"a labelled JSONL file (scheme in data/README.md; default: the "
                                                f"shipped {DEFAULT_SET!r} set)")
    v.add_argument("--split", default="test", choices=SPLITS, help="the split to score (default: test)")
    v.add_argument("--judges", default="keyword,embedding-response,reader",
                   help=f"response judges, comma-separated: {' | '.join(RESPONSE_JUDGES)}")
    add_endpoint_arguments(v)
    v.add_argument("--local-lm-model", default=ALIGNED, help="local-lm: the judging model")
    v.add_argument("--out", default="judge-validation.json", help="where the JSON report goes")
    v.set_defaults(fn=cmd_validate_judges)


def cmd_rejudge(args) -> int:
    from staysafe.eval.rejudge import rejudge_experiment, rejudge_run
    from staysafe.eval.validation import build_judge, check_judge_names

    names = check_judge_names(args.judges)  # checked before any judge loads a model
    target = Path(args.target)
    if not (target / "experiment.json").is_file() and not (target / "config.json").is_file():
        raise SpecError(f"{target} is neither a run directory (config.json) nor an experiment (experiment.json)")
    judges = [build_judge(n, endpoint=endpoint_from_args(args), local_lm_model=args.local_lm_model) for n in names]
    if (target / "experiment.json").is_file():
        results = rejudge_experiment(target, args.runs_dir or runs_root_default(), judges)
        print(f"re-judged {len(results)} run(s); results.parquet, results.md (and the frontier) rebuilt in {target}")
    else:
        columns = rejudge_run(target, judges)
        print(f"added {', '.join(columns)} to {target / 'evals.parquet'}")
    return 0


def add_rejudge(sub) -> None:
    r = sub.add_parser("rejudge", help="score a run's (or an experiment's) recorded answers with response judges; "
                                       "add their ASR to its evaluations without the model")
    r.add_argument("target", help="a run directory, or an experiment directory (then its runs under --runs-dir)")
    r.add_argument("--judges", default=DEFAULT_RESPONSE_JUDGE,
                   help=f"response judges, comma-separated: {' | '.join(RESPONSE_JUDGES)}")
    r.add_argument("--runs-dir", default=None, help="an experiment's runs (default: $STAYSAFE_RUNS or ./runs; never "
                                                    "the folder its experiment.json names)")
    add_endpoint_arguments(r)
    r.add_argument("--local-lm-model", default=ALIGNED, help="local-lm: the judging model")
    r.set_defaults(fn=cmd_rejudge)


def build_parser() -> argparse.ArgumentParser:
    from staysafe.presets import PRESETS

    p = argparse.ArgumentParser(prog="staysafe", description="Study and prevent safety degradation in fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune with sft / constant-kl / adaptive safety regularisation")
    add_spec_arguments(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run directory from its last checkpoint")
    t.add_argument("--config", metavar="FILE", help="options from a JSON file (a run's config.json); flags override; "
                   "the file never sets where the run goes or the judge endpoint")
    add_endpoint_arguments(t)
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="defaults for a common use (flags override): " +
                        "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()))
    t.set_defaults(fn=cmd_train)
    p.train_parser = t  # main() gives it a preset's defaults

    r = sub.add_parser("runs", help="list run directories")
    r.add_argument("--runs-dir", default=None, help="default: $STAYSAFE_RUNS, else ./runs")
    r.set_defaults(fn=cmd_runs)

    m = sub.add_parser("models", help="known models and whether each is ready")
    m.set_defaults(fn=cmd_models)

    a = sub.add_parser(
        "align", help="build the aligned reference smollm2-135m-aligned locally (StaySafe also ships one)"
    )
    from staysafe.models.aligned import AlignSettings
    from staysafe.options import PRECISIONS

    d = AlignSettings()
    a.add_argument("--steps", type=int, default=d.steps)
    a.add_argument("--lr", type=float, default=d.lr)
    a.add_argument("--batch-size", type=int, default=d.batch_size)
    a.add_argument("--seed", type=int, default=d.seed)
    a.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    a.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    a.add_argument("--defense", default=d.defense, choices=DEFENSES,
                   help="vaccine: the perturbation-aware alignment of Huang et al. 2024, built as "
                        "smollm2-135m-aligned-vaccine (the experiment method 'vaccine' fine-tunes it with sft)")
    a.add_argument("--vaccine-rho", type=float, default=d.vaccine_rho, help="vaccine: the perturbation size")
    a.add_argument(
        "--export",
        action="store_true",
        help="maintainers: copy the (built) local adapter and its report into the package as the shipped reference",
    )
    a.set_defaults(fn=cmd_align)

    f = sub.add_parser("fit-probe", help="collect activations, sweep layers, fit and save a probe")
    f.add_argument("--model", default=ALIGNED)
    f.add_argument("--train", default="refusals,align-benign", help="labelled prompt sets to fit on")
    f.add_argument("--test", default="eval-harmful,eval-benign", help="held-out labelled prompt sets")
    f.add_argument("--layer", default=None, help="fix the layer (or comma-separated layers to concatenate)")
    f.add_argument("--position", default="last_prompt_token", choices=POSITIONS)
    f.add_argument("--out", default="probe/probe.json")
    f.add_argument("--save-activations", action="store_true")
    f.set_defaults(fn=cmd_fit_probe)

    c = sub.add_parser("compare-risk", help="score examples with the probe and every judge; write a comparison")
    c.add_argument("--model", default=ALIGNED)
    c.add_argument("--data", default="eval-harmful,eval-benign", help="labelled sets or files, comma-separated")
    c.add_argument("--judges", default="embedding,local-lm", help="judges to compare with the probe")
    c.add_argument("--probe", default=None, help="a saved probe; default: the model's default probe")
    c.add_argument("--threshold", type=float, default=0.5)
    c.add_argument("--out", default="compare")
    c.set_defaults(fn=cmd_compare_risk)

    e = sub.add_parser("experiment", help="run several methods under the same data order and seeds")
    add_spec_arguments(e, ExperimentSpec)  # one flag per ExperimentSpec field (staysafe.options)
    e.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a train option for every run, e.g. --set per_example_beta=true (repeatable)")
    e.add_argument("--sweep", action="append", default=[], metavar="OPTION=V1,V2,...",
                   help="run every value (repeatable: the grid) for the methods that read the option, e.g. --sweep "
                        "beta=0.05,0.1,0.3,0.5,0.7,0.9; the others run once per seed")
    add_endpoint_arguments(e)
    e.add_argument("--resume", metavar="ID", default=None,
                   help="continue experiment ID (under --out-dir) with the options it was started with: finished "
                        "runs are kept, an interrupted one continues from its last checkpoint")
    e.set_defaults(fn=cmd_experiment)

    q = sub.add_parser("queue", help="the dashboard's launch queue: list, pause, resume, cancel")
    q.add_argument("action", choices=("list", "pause", "resume", "cancel", "work"),
                   help="work: run the queued jobs one by one (started for you by every launch)")
    q.add_argument("job_id", nargs="?", default=None, help="the job to cancel")
    q.add_argument("--runs-dir", default=None, help="default: $STAYSAFE_RUNS, else ./runs")
    q.add_argument("--experiments-dir", default=None,
                   help="where queued experiments go (default: $STAYSAFE_EXPERIMENTS, else ./experiments)")
    q.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    q.set_defaults(fn=cmd_queue)

    sl = sub.add_parser("safelora", help="Safe LoRA on a finished LoRA run: project its adapter onto the alignment "
                        "subspace, evaluate again, write <run>-safelora")
    sl.add_argument("run_dir")
    fields = {f.name: f for f in dataclasses.fields(RunSpec)}
    sl.add_argument("--threshold", type=float, default=None,
                    help=help_text(fields["safelora_threshold"]) + " (default: the run's own setting)")
    sl.add_argument("--layers", type=int, default=None,
                    help=help_text(fields["safelora_layers"]) + " (default: the run's own setting)")
    sl.add_argument("--unaligned", default=None, help=help_text(fields["safelora_unaligned"]))
    sl.set_defaults(fn=cmd_safelora)

    add_validate_judges(sub)
    add_rejudge(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.preset:  # a preset's options become defaults; explicit flags still win
        from staysafe.presets import preset_options

        parser.train_parser.set_defaults(**preset_options(args.preset))
        args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except StaySafeError as err:  # user errors: the message says what to fix; anything else keeps its traceback
        print(f"staysafe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the run is already marked cancelled, its rows kept
        print(f"staysafe {args.command}: cancelled{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
