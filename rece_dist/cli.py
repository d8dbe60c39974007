"""The ``rece`` command: a thin shell over the library. Errors print one line, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import ReceError

Handler = Callable[[argparse.Namespace], int]


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_store

    report = validate_store(args.store)
    print(report.summary())
    return 0


def _settings(args: argparse.Namespace):
    from .pipeline import TrainSettings

    return TrainSettings(
        specialists=args.specialists, quantiles=tuple(args.quantiles), clustering=args.clustering,
        temperature=args.temperature, top_k=args.top_k, l1=args.l1, noncrossing=not args.allow_crossing,
        solver=args.solver, date_from=args.date_from, date_to=args.date_to, seed=args.seed,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from .runner import train_and_publish

    train_and_publish(args.store, args.out, _settings(args), ray_address=args.ray_address)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .runner import demo

    demo(args.store, args.out, _settings(args), ray_address=args.ray_address)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .config import load_config_file
    from .ensemble import RECEModel, predict_payload
    from .errors import ArtifactError
    from .publish import load_artifact

    doc = load_artifact(args.artifact)
    cfg = load_config_file(args.config)
    try:
        with open(args.input) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{args.input}: input file not found") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{args.input}: not valid JSON ({exc})") from None
    print(json.dumps(predict_payload(RECEModel(doc), cfg, payload, args.input), indent=1))
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--specialists", "-k", type=int, default=4, help="number of specialists K (default 4)")
    g.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="quantiles to fit")
    g.add_argument("--clustering", choices=["kmeans", "agglomerative"], default="kmeans")
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the mixing")
    g.add_argument("--top-k", type=int, default=None, help="mix only the k most similar specialists")
    g.add_argument("--l1", type=float, default=0.0, help="L1 penalty (scikit-learn's alpha) on scaled coefficients")
    g.add_argument("--allow-crossing", action="store_true", help="skip the non-crossing re-solve")
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

    t = sub.add_parser("train", help="train a RECE artifact from a store and publish it")
    t.add_argument("--store", required=True, help="trace store: folder or s3://bucket/prefix")
    t.add_argument("--out", required=True, help="artifact root: folder or s3://bucket/prefix")
    _add_train_options(t)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ReceError as exc:
        print(f"rece: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rece: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
