"""The ``rece`` command: a thin shell over the library. Errors print one line, exit code 2."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from .errors import ReceError
from .settings import EVALUATION_ROWS_PER_CONFIG, SWEEP_FOLDS

Handler = Callable[[argparse.Namespace], int]


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_store

    report = validate_store(args.store)
    print(report.summary())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    if args.check_reference:
        from .realism import check_reference

        report = check_reference(args.check_reference, seed=args.seed)
        print(report.table())
        return 0 if report.all_passed else 1
    if not args.out:
        raise ReceError("synth needs --out STORE (or --check-reference RUNS_DIR)")
    from .synth import generate_store

    print(generate_store(args.out, args.configs, args.steps_per_config, args.seed, args.days, args.start_date,
                         fmt=args.format).summary())
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest.run import IngestOptions, ingest, parse_time_origin

    opts = IngestOptions(fmt=args.format, encoding=args.encoding, strict=args.strict, chunk_bytes=args.chunk_mib << 20,
                         step_sample_rate=args.step_sample_rate,
                         time_origin_ns=parse_time_origin(args.time_origin) if args.time_origin else None)
    for summary in ingest(args.files, args.store, args.config, opts):
        print(summary.text())
    return 0


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _iso_date(s: str) -> str:
    from datetime import date

    try:
        return date.fromisoformat(s).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {s!r}") from None


def _settings(args: argparse.Namespace):
    from .pipeline import TrainSettings

    return TrainSettings(
        specialists=args.specialists, quantiles=tuple(args.quantiles), clustering=args.clustering,
        temperature=args.temperature, top_k=args.top_k, borrow=args.borrow, calibrate_folds=args.calibrate_folds,
        select_folds=args.select_folds, l1=args.l1, noncrossing=not args.allow_crossing,
        max_fit_rows=args.max_fit_rows, rows_per_config=args.rows_per_config, solver=args.solver,
        date_from=args.date_from, date_to=args.date_to, seed=args.seed,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from .api import train

    train(args.store, _settings(args), publish_to=args.out, ray_address=args.ray_address,
          max_regression=None if args.force else args.max_regression, feature_cache=args.feature_cache)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .runner import demo

    demo(args.store, args.out, _settings(args), ray_address=args.ray_address)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .api import load_artifact
    from .config import load_config_file
    from .ensemble import predict_payload
    from .errors import ArtifactError
    from .progress import log

    model = load_artifact(args.artifact)
    cfg = load_config_file(args.config)
    try:
        with open(args.input) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{args.input}: input file not found") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{args.input}: not valid JSON ({exc})") from None
    out = predict_payload(model, cfg, payload, args.input)
    for warning in out.get("warnings", []):
        log(f"[predict] warning: {warning}")
    print(json.dumps(out, indent=1))
    return 0


def _top_k_value(s: str) -> int | None:
    """``--top-k-grid`` entries: a positive integer, or ``dense`` for mixing every specialist."""
    if s == "dense":
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dense', got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("top-k values must be at least 1")
    return v


def _grid_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sensitivity grid")
    g.add_argument("--k-grid", type=int, nargs="+", default=[1, 2, 4, 6], help="numbers of specialists K to try")
    g.add_argument("--temperatures", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3], help="temperatures to try")
    g.add_argument("--top-k-grid", type=_top_k_value, nargs="+", default=[1, 2, None],
                   help="top-k values to try ('dense': all specialists)")
    g.add_argument("--borrow-grid", type=float, nargs="+", default=None,
                   help="borrow values to try (default: the training setting only; each value refits every K > 1)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import EvalOptions, evaluate_artifact
    from .evaluate import PROTOCOLS, baseline_text

    options = EvalOptions(
        protocols=PROTOCOLS if args.protocol == "all" else (args.protocol,), sparse_top_k=args.sparse_top_k,
        cv_folds=args.folds, k_grid=tuple(args.k_grid), temperatures=tuple(args.temperatures),
        top_ks=tuple(args.top_k_grid), borrows=None if args.borrow_grid is None else tuple(args.borrow_grid),
        fit_rows=None if args.fit_rows == 0 else args.fit_rows)
    rv = evaluate_artifact(args.artifact, args.store, options, donors=not args.no_donor_experiment,
                           max_regression=args.max_regression, report=args.report, ray_address=args.ray_address)
    print(baseline_text(rv.evaluation))
    if rv.drift is not None:
        print(f"drift vs previous version: {rv.drift.reason}")
    print(f"report: {rv.report}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .api import tune
    from .evaluate import sweep_text

    print(sweep_text(tune(args.store, _settings(args), folds=args.folds, k_grid=args.k_grid,
                          temperatures=args.temperatures, top_ks=args.top_k_grid, borrows=args.borrow_grid,
                          ray_address=args.ray_address)))
    return 0


def _cmd_donors(args: argparse.Namespace) -> int:
    from .donors import load_candidates, new_candidates, picks_table, rank_donors
    from .evaluate import text_table
    from .store import Store

    stored = Store(args.store).configs()
    candidates, dropped = new_candidates(stored, load_candidates(args.candidates))
    for why in dropped:
        print(f"skipped: {why}")
    print(text_table(picks_table(rank_donors(list(stored.values()), candidates, args.n))))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from .artifact import canonical_json, load
    from .blis import golden_vectors, probe_configs
    from .publish import ManifestMeta, publish

    doc = load(args.artifact)
    training = doc["training"]
    meta = ManifestMeta(git_commit=training["git_commit"], settings=training["settings"], data=[],
                        date_from=training["date_window"][0], date_to=training["date_window"][1],
                        versions=training["versions"])
    golden = canonical_json(golden_vectors(doc, probe_configs()), "golden vectors")
    v = publish(args.out, doc, meta, companions={"golden.json": golden})
    print(f"{v.version} {v.uri} (previous {v.previous})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import os

    from .api import load_artifact
    from .artifact import canonical_json
    from .blis import coefficient_sets, golden_vectors, probe_configs

    model = load_artifact(args.artifact)
    doc, manifest = model.document, model.manifest
    os.makedirs(args.out, exist_ok=True)
    if args.format == "golden":
        path = os.path.join(args.out, "golden.json")
        with open(path, "wb") as f:
            f.write(canonical_json(golden_vectors(doc, probe_configs()), "golden vectors"))
        print(path)
        return 0
    version = manifest["version"] if manifest else "unpublished"
    for cid, text in coefficient_sets(doc, version).items():
        path = os.path.join(args.out, f"{cid}.yaml")
        with open(path, "w") as f:
            f.write(text)
        print(path)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .api import load_artifact
    from .artifact import summary_table

    model = load_artifact(args.artifact)
    doc, manifest = model.document, model.manifest
    t = doc["training"]
    if manifest:
        print(f"version {manifest['version']}  sha256 {manifest['artifact_sha256'][:16]}...  "
              f"created {manifest.get('created_at')}  previous {manifest.get('previous')}")
    print(f"schema {doc['schema_version']}  commit {t['git_commit'][:12]}  dates {t['date_window'][0]}..{t['date_window'][1]}"
          f"  configurations {t['configurations']}  specialists {len(doc['specialists'])}"
          f"  mixing T={doc['mixing']['temperature']} top-k={doc['mixing']['top_k']}")
    for s in doc["specialists"]:
        labels = ", ".join(doc["configurations"][c]["label"] for c in s["members"])
        print(f"  specialist {s['id']}: {labels}")
    print(summary_table(doc))
    sel = t.get("selection")
    if sel:
        crit = sel["criterion"]
        print(f"model per target ({sel['folds']}-fold {sel['method']}, relative pinball on held-out configurations): "
              + "; ".join(f"{tt} {doc['targets'][tt]['model']} (specialists {crit['specialists'][tt]:.4g}, pooled "
                          f"{crit['pooled'][tt]:.4g})" for tt in ("alpha", "beta")))
    cal = doc.get("unseen_calibration")
    if cal:
        widen = "; ".join(f"{t} " + " ".join(f"P{float(q) * 100:g} x{f:.3g}" for q, f in fs.items())
                          for t, fs in cal["factors"].items())
        print(f"unseen configurations: intervals widened from the median ({cal['folds']}-fold {cal['method']}): {widen}")
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--specialists", "-k", type=int, default=4, help="number of specialists K (default 4)")
    g.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="quantiles to fit")
    g.add_argument("--clustering", choices=["kmeans", "agglomerative"], default="kmeans")
    g.add_argument("--temperature", type=float, default=0.03,
                   help="softmax temperature of the mixing, in RMS log-latency units (default 0.03)")
    g.add_argument("--top-k", type=int, default=None, help="mix only the k most similar specialists")
    g.add_argument("--borrow", type=float, default=0.1,
                   help="share of every non-member configuration in a specialist's fit, relative to a member's, "
                        "taken as a row sample (0: members only; 1: the global model)")
    g.add_argument("--calibrate-folds", type=int, default=0,
                   help="widen intervals for configurations not in training, measured by this many refits over "
                        "groups of configurations (0: off)")
    g.add_argument("--select-folds", type=int, default=6,
                   help="per target, keep the specialists only if they beat one pooled model on configurations "
                        "held out in this many refits over groups of configurations (default 6; 0: always keep them)")
    g.add_argument("--l1", type=float, default=0.0, help="L1 penalty (scikit-learn's alpha) on scaled coefficients")
    g.add_argument("--allow-crossing", action="store_true", help="skip the non-crossing re-solve")
    g.add_argument("--max-fit-rows", type=int, default=10_000_000,
                   help="a specialist with more training rows is fitted over its shards (no task stacks them; "
                        "no non-crossing re-solve)")
    g.add_argument("--rows-per-config", type=_positive_int, default=None,
                   help="fit on a fixed random sample of at most this many training rows per configuration and "
                        "target (default: every row)")
    g.add_argument("--solver", default="HIGHS", help="cvxpy LP solver (HIGHS, CLARABEL)")
    g.add_argument("--date-from", help="first date to train on (YYYY-MM-DD)")
    g.add_argument("--date-to", help="last date to train on (YYYY-MM-DD)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rece", description="RECE latency-model training for BLIS")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check every table and configuration in a store")
    v.add_argument("store", help="local folder or s3://bucket/prefix")
    v.set_defaults(fn=_cmd_validate)

    sy = sub.add_parser("synth", help="generate a store of realistic synthetic vLLM traces, or check the generator against real runs")
    sy.add_argument("--out", help="store to write: local folder or s3://bucket/prefix")
    sy.add_argument("--configs", type=_positive_int, default=12, help="number of configurations (default 12)")
    sy.add_argument("--steps-per-config", type=_positive_int, default=20000, help="engine steps per configuration (default 20000)")
    sy.add_argument("--seed", type=int, default=0, help="random seed; the same arguments give byte-identical files (default 0)")
    sy.add_argument("--days", type=_positive_int, default=3, help="days (date partitions) to spread each configuration over (default 3)")
    sy.add_argument("--start-date", type=_iso_date, default="2026-11-01", help="first day, YYYY-MM-DD (default 2026-11-01)")
    sy.add_argument("--check-reference", metavar="RUNS_DIR",
                    help="instead of writing a store, replay the reference runs in RUNS_DIR and compare TTFT/TPOT medians")
    sy.add_argument("--format", choices=["store", "otlp"], default="store",
                    help="store: Parquet partitions; otlp: the OTLP/JSON traces instrumented vLLM would export, "
                         "one otlp/<config_id>.jsonl per configuration, for `rece ingest` (default store)")
    sy.set_defaults(fn=_cmd_synth)

    ig = sub.add_parser("ingest", help="import real traces (OTLP from vLLM, BLIS TraceV2, inference-perf) into a store")
    ig.add_argument("files", nargs="+", metavar="FILE_OR_URI", help="local paths or s3:// URIs; globs allowed")
    ig.add_argument("--format", choices=["otlp", "tracev2", "inference-perf"], required=True)
    ig.add_argument("--config", action="append", required=True, metavar="[SERVICE=]CFG",
                    help="configuration document or experiment folder (exp-config.yaml + config.json); "
                         "SERVICE=CFG routes one service.name of a multi-deployment OTLP file (repeatable)")
    ig.add_argument("--store", required=True, help="store to write into: folder or s3://bucket/prefix (created if absent)")
    ig.add_argument("--encoding", choices=["json", "proto"], default="json",
                    help="OTLP file encoding: JSON lines or length-prefixed protobuf (gzip/zstd detected either way)")
    ig.add_argument("--strict", action="store_true", help="fail on the first bad row instead of quarantining it")
    ig.add_argument("--step-sample-rate", type=float, default=None,
                    help="vLLM's --step-tracing-sample-rate, recorded per partition (default: estimated from step.id gaps)")
    ig.add_argument("--time-origin", default=None,
                    help="UTC time (ISO-8601) of the first request, for client clocks without an epoch "
                         "(inference-perf; TraceV2 without created_at)")
    ig.add_argument("--chunk-mib", type=_positive_int, default=64, help="chunk size in MiB; memory per task is bounded by it")
    ig.set_defaults(fn=_cmd_ingest)

    t = sub.add_parser("train", help="train a RECE artifact from a store and publish it")
    t.add_argument("--store", required=True, help="trace store: folder or s3://bucket/prefix")
    t.add_argument("--out", required=True, help="artifact root: folder or s3://bucket/prefix")
    _add_train_options(t)
    t.add_argument("--max-regression", type=float, default=0.05,
                   help="refuse to publish if mean held-out pinball loss is worse than latest's by more (default 0.05)")
    t.add_argument("--force", action="store_true", help="publish without comparing against latest")
    t.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse per-partition features cached under OUT/features/ and cache new ones, so a nightly "
                        "run over a rolling window reads only the new days' traces (default: on)")
    t.set_defaults(fn=_cmd_train)

    d = sub.add_parser("demo", help="generate a small store if absent, train on local Ray, print a summary")
    d.add_argument("--store", default="demo-store")
    d.add_argument("--out", default="demo-artifacts")
    _add_train_options(d)
    d.set_defaults(fn=_cmd_demo)

    pr = sub.add_parser("predict", help="evaluate an artifact for a configuration and input rows")
    pr.add_argument("--artifact", required=True, help="artifact.json, or an artifact root (uses latest)")
    pr.add_argument("--config", required=True, help="configuration document (JSON/YAML)")
    pr.add_argument("--input", required=True, help='JSON: {"alpha": [rows], "beta": [rows]}')
    pr.set_defaults(fn=_cmd_predict)

    pu = sub.add_parser("publish", help="publish an artifact.json as a new version under an artifact root")
    pu.add_argument("--artifact", required=True, help="artifact.json to publish")
    pu.add_argument("--out", required=True, help="artifact root: folder or s3://bucket/prefix")
    pu.set_defaults(fn=_cmd_publish)

    ex = sub.add_parser("export", help="golden test vectors or blis-registry CoefficientSet YAML per configuration")
    ex.add_argument("--artifact", required=True, help="artifact.json, an artifact root (latest) or ROOT@v-...")
    ex.add_argument("--format", choices=["coefficient-set", "golden"], required=True)
    ex.add_argument("--out", required=True, help="folder to write into")
    ex.set_defaults(fn=_cmd_export)

    sh = sub.add_parser("show", help="describe an artifact: version, specialists, held-out metrics")
    sh.add_argument("artifact", help="artifact.json, an artifact root (latest) or ROOT@v-...")
    sh.set_defaults(fn=_cmd_show)

    ev = sub.add_parser("evaluate", help="validate an artifact's recipe against baselines and write an HTML report")
    ev.add_argument("--artifact", required=True, help="artifact.json, or an artifact root (uses latest)")
    ev.add_argument("--store", required=True, help="trace store: folder or s3://bucket/prefix")
    ev.add_argument("--report", required=True, help="folder to write index.html and its PNGs into")
    ev.add_argument("--protocol", choices=["loco", "logo", "lomo", "temporal", "all"], default="all",
                    help="validation protocol (default: all that the store allows)")
    ev.add_argument("--sparse-top-k", type=int, default=2, help="k of the sparse RECE variant (default 2)")
    ev.add_argument("--folds", type=int, default=SWEEP_FOLDS,
                    help=f"folds over configurations for the sensitivity sweep (default {SWEEP_FOLDS}; "
                         "at least the number of configurations: leave one out)")
    ev.add_argument("--no-donor-experiment", action="store_true", help="skip the donor-selection experiment")
    ev.add_argument("--fit-rows", type=int, default=EVALUATION_ROWS_PER_CONFIG, metavar="N",
                    help="every refit trains on a fixed random sample of at most N rows per configuration and "
                         f"target (default {EVALUATION_ROWS_PER_CONFIG:,}; 0: every training row, as the artifact was fitted)")
    ev.add_argument("--max-regression", type=float, default=0.05,
                    help="pinball regression vs the previous version that counts as worse (default 0.05)")
    ev.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    _grid_options(ev)
    ev.set_defaults(fn=_cmd_evaluate)

    tu = sub.add_parser("tune", help="pick K, temperature and top-k by grouped cross-validation over configurations")
    tu.add_argument("--store", required=True, help="trace store: folder or s3://bucket/prefix")
    tu.add_argument("--folds", type=int, default=SWEEP_FOLDS,
                    help=f"folds over configurations (default {SWEEP_FOLDS}; at least the number of configurations: "
                         "leave one out)")
    _add_train_options(tu)
    _grid_options(tu)
    tu.set_defaults(fn=_cmd_tune)

    do = sub.add_parser("donors", help="rank candidate configurations by the embedding coverage they add")
    do.add_argument("--store", required=True, help="trace store whose configurations are already covered")
    do.add_argument("--candidates", required=True, help="YAML/JSON list of configuration documents")
    do.add_argument("--n", type=int, default=5, help="how many to pick (default 5)")
    do.set_defaults(fn=_cmd_donors)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ReceError as exc:
        print(f"rece: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM once Ray is connected (runner.connect_ray)
        from .runner import interrupting_signal

        name = interrupting_signal()
        notes = "".join(f"; {n}" for n in getattr(exc, "__notes__", ()))
        print(f"rece: interrupted by {name}{notes}", file=sys.stderr)
        return 128 + signal.Signals[name].value


if __name__ == "__main__":
    sys.exit(main())
