"""`vireo runs compare|plot`: runs side by side and their learning curves, read back through MLflow's own
search API from the store the mlflow tracker wrote (services.tracking.MlflowBackend)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

DEFAULT_METRICS = ("reward/mean", "reward/accuracy", "actor/entropy", "actor/critical_entropy",
                   "eval/heldout/accuracy", "timing_s/step")
CURVES = (("reward/mean", "reward (train)"), ("eval/heldout/accuracy", "held-out accuracy"),
          ("actor/entropy", "policy entropy (nats)"))


def default_tracking_uri(out_dir: str | Path = "runs") -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite file in the runs folder (the run directories' parent)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def local_store(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI, the folder of a file store, None for a server (http…)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return None


def search(tracking_uri: str, experiment: str | None, runs: list[str], max_results: int = 20):
    """Runs as MLflow's DataFrame, in the order named (vireo run_id tag or MLflow run id), else the
    experiment's latest, oldest first (every experiment's when none is named). A name that matches nothing
    raises LookupError."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    scope = {"experiment_names": [experiment]} if experiment else {"search_all_experiments": True}
    if not runs:
        found = mlflow.search_runs(**scope, max_results=max_results, order_by=["attributes.start_time DESC"])
        return found.iloc[::-1].reset_index(drop=True)
    frames = []
    for name in runs:  # MLflow's filter has no OR and no IN for tags: one search per name
        quoted = name.replace("'", "")
        found = mlflow.search_runs(**scope, filter_string=f"tags.run_id = '{quoted}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found.empty:
            found = mlflow.search_runs(**scope, filter_string=f"attributes.run_id = '{quoted}'")
        if found.empty:
            raise LookupError(f"no MLflow run named {name!r} in {experiment or 'any experiment'} at {tracking_uri}")
        frames.append(found)
    return pd.concat(frames, ignore_index=True)


def compare_table(frame, metrics: list[str] | None = None, params: list[str] | None = None) -> str:
    """One column per run; the params asked for (default: those that differ between the runs) and the
    metrics asked for (default: DEFAULT_METRICS), each metric at its last logged step."""
    names = [str(t) if isinstance(t, str) else u for t, u in zip(frame.get("tags.run_id", frame["run_id"]),
                                                                 frame["run_id"])]
    if params is None:
        columns = [c for c in frame.columns if c.startswith("params.")]
        params = [c[len("params."):] for c in columns if frame[c].astype(str).nunique() > 1]
    rows = [("mlflow run", list(frame["run_id"].str[:12])), ("status", list(frame["status"]))]
    rows += [(f"params.{p}", [_cell(v) for v in frame.get(f"params.{p}", [None] * len(frame))]) for p in params]
    rows += [(m, [_cell(v) for v in frame.get(f"metrics.{m}", [None] * len(frame))])
             for m in (metrics or DEFAULT_METRICS)]
    width = max(len(k) for k, _ in rows) + 2
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) + 2 for i, n in enumerate(names)]
    lines = ["".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cols))]
    lines += [k.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cols)) for k, values in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_runs(client, run_uuids: list[str], out: str | Path) -> Path:
    """Reward, held-out accuracy and entropy against the step, one line per run (tag run_id as label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2), constrained_layout=True)
    for uuid in run_uuids:
        label = client.get_run(uuid).data.tags.get("run_id", uuid[:12])
        for ax, (key, _) in zip(axes, CURVES):
            history = sorted((m.step, m.value) for m in client.get_metric_history(uuid, key))
            if history:
                ax.plot(*zip(*history), marker="." if len(history) < 30 else None, label=label)
    for ax, (_, title) in zip(axes, CURVES):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vireo runs", description="Compare runs and plot their curves (MLflow).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("compare", "print runs side by side"), ("plot", "draw reward, held-out accuracy, entropy")):
        p = sub.add_parser(name, help=text)
        p.add_argument("runs", nargs="*" if name == "compare" else "+", metavar="RUN",
                       help="vireo run_id (the run directory's name) or MLflow run id")
        p.add_argument("--experiment", default=None, help="MLflow experiment (default: all)")
        p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    compare, plot = sub.choices["compare"], sub.choices["plot"]
    compare.add_argument("--metrics", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_METRICS)}")
    compare.add_argument("--params", nargs="+", default=None, help="default: the params that differ")
    plot.add_argument("--out", default="curves.png")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    store = local_store(uri)
    if store is not None and not store.exists():  # reading must not create an empty store (or its folders)
        print(f"vireo runs: no MLflow store at {store} (tracking URI {uri})", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DatabaseError

    try:
        frame = search(uri, args.experiment, args.runs)
    except LookupError as exc:
        print(f"vireo runs: {exc}", file=sys.stderr)
        return 2
    except (MlflowException, DatabaseError) as exc:  # a damaged store (a cut mlflow.db)
        print(f"vireo runs: cannot read the MLflow store at {uri}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if frame.empty:
        print(f"vireo runs: no runs in {args.experiment or 'any experiment'} at {uri}", file=sys.stderr)
        return 2
    if args.command == "compare":
        print(compare_table(frame, args.metrics, args.params))
    else:
        from mlflow import MlflowClient

        print(f"wrote {plot_runs(MlflowClient(uri), list(frame['run_id']), args.out)}")
    return 0
