"""Command line: compare gradient estimators and codebook initialisations by training VQ-VAEs.

``python -m rotvq.lab.experiment`` (or the console script ``rotvq-experiment``) trains one
small VQ-VAE (:mod:`rotvq.lab.models`) per combination of estimator x initialisation x seed
on one dataset, evaluates each on the held-out split, and writes into ``--out``:

* ``runs.csv`` -- one row per run: its settings, the final training metrics (mean over the
  last 5 % of the steps) as ``train_*`` and the test-split metrics of
  :func:`rotvq.lab.training.evaluate` as ``test_*``, and the wall time;
* ``history.csv`` -- one row per run and step (the :class:`rotvq.lab.training.History`);
* ``curves.png`` -- training curves (reconstruction loss, perplexity, mean ``|z|`` and
  mean ``|q|``), one line per estimator / initialisation, averaged over seeds.

matplotlib is needed only for the plot and is imported only then (``--no-plots`` skips
it).  Run ``python -m rotvq.lab.experiment --help`` for the options and examples.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import itertools
import pathlib
import sys
import time
from typing import Sequence

import numpy as np
import torch

from . import datasets
from ..estimators import SURROGATE_NAMES
from ..quantizer import INITS
from .training import METRICS, History, TrainConfig, build_model, evaluate, train

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  # STE vs. rotation trick on the embedded digits, 3 seeds (about a minute on a laptop CPU)
  python -m rotvq.lab.experiment --estimators ste rotation --seeds 0 1 2 --out runs/digits

  # does k-means initialisation rescue the STE when codes start much shorter than z?
  python -m rotvq.lab.experiment --estimators ste rotation --inits normal kmeans \\
      --init-scale 0.01 --out runs/small-codes

  # image patches with the convolutional model
  python -m rotvq.lab.experiment --dataset patches --model conv --out runs/patches

  # MNIST from local IDX files (nothing is downloaded), on a GPU
  python -m rotvq.lab.experiment --mnist ~/data/mnist --device cuda --steps 5000 --out runs/mnist

outputs (in --out): runs.csv (one row per run), history.csv (one row per run and step),
curves.png (training curves; needs matplotlib, skip with --no-plots).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for documentation and tests)."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="rotvq-experiment",
        description="Train small VQ-VAEs for every combination of gradient estimator, codebook "
                    "initialisation and seed; write a CSV of results, the per-step histories "
                    "and a plot of the training curves.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (default: the embedded digits)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=("digits", "patches"), default="digits",
                        help="embedded dataset: 8x8 handwritten digits or 8x8 RGB photo patches")
    source.add_argument("--mnist", metavar="ROOT", help="folder with the MNIST IDX files")
    source.add_argument("--cifar10", metavar="ROOT",
                        help="folder with cifar-10-batches-py (or that folder itself)")

    grid = parser.add_argument_group("what to compare (every combination is one run)")
    grid.add_argument("--estimators", nargs="+", choices=SURROGATE_NAMES,
                      default=["ste", "rotation"], metavar="NAME",
                      help=f"gradient estimators, from: {', '.join(SURROGATE_NAMES)} "
                           "(default: ste rotation)")
    grid.add_argument("--inits", nargs="+", choices=INITS, default=["normal"], metavar="INIT",
                      help=f"codebook initialisations, from: {', '.join(INITS)} (default: normal)")
    grid.add_argument("--seeds", nargs="+", type=_seed, default=[0], metavar="SEED",
                      help="random seeds (default: 0)")

    pos_int, pos_float, nonneg = _positive_int, _positive_float, _nonnegative_float
    d = "(default: %(default)s)"
    opt = parser.add_argument_group("training")
    opt.add_argument("--steps", type=pos_int, default=defaults.steps,
                     help=f"optimizer steps per run {d}")
    opt.add_argument("--batch-size", type=pos_int, default=defaults.batch_size, help=d)
    opt.add_argument("--lr", type=pos_float, default=defaults.lr, help=f"Adam learning rate {d}")
    opt.add_argument("--device", default=defaults.device,
                     help=f"torch device, e.g. cpu or cuda {d}")
    opt.add_argument("--threads", type=pos_int, help="torch CPU threads (default: torch's choice)")

    vq = parser.add_argument_group("quantizer")
    vq.add_argument("--codebook-size", type=pos_int, default=defaults.codebook_size, help=d)
    vq.add_argument("--latent-dim", type=pos_int, default=defaults.latent_dim,
                    help=f"code dimension {d}")
    vq.add_argument("--init-scale", type=pos_float, default=defaults.init_scale,
                    help="std (normal) or half-width (uniform) of the initial codes; small values "
                         f"give |q| << |z| {d}")
    vq.add_argument("--beta", type=nonneg, default=defaults.beta, help=f"codebook-loss weight {d}")
    vq.add_argument("--gamma", type=nonneg, default=defaults.gamma,
                    help=f"commitment-loss weight {d}")
    vq.add_argument("--ema", action="store_true", help="update the codebook by moving averages")
    vq.add_argument("--dead-code-threshold", type=nonneg, default=defaults.dead_code_threshold,
                    help="restart codes used less than this (EMA count); 0 = never (default)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=("mlp", "conv"), default=defaults.model, help=d)
    model.add_argument("--hidden", type=pos_int, default=defaults.hidden,
                       help=f"hidden width / channels {d}")
    model.add_argument("--num-latents", type=pos_int, default=defaults.num_latents,
                       help=f"latent vectors per input, mlp only {d}")
    model.add_argument("--downsamples", type=int, choices=range(0, 4), default=defaults.downsamples,
                       metavar="{0..3}", help=f"stride-2 stages, conv only {d}")
    model.add_argument("--encoder-scale", type=pos_float, default=defaults.encoder_scale,
                       help=f"fixed gain on the encoder output {d}")
    model.add_argument("--encoder-norm", type=pos_float,
                       help="start training with mean |z| equal to this")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/experiment"),
                     help="output folder, created if needed (default: %(default)s)")
    out.add_argument("--no-plots", action="store_true",
                     help="skip curves.png (no matplotlib needed)")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="per-step progress on stderr (default: only on a terminal, long runs)")
    return parser


def _load(args) -> tuple[str, datasets.LabeledData, datasets.LabeledData]:
    """(name, train split, test split) of the dataset the command line selects."""
    if args.mnist:
        name, loader = "mnist", functools.partial(datasets.load_mnist, args.mnist)
    elif args.cifar10:
        name, loader = "cifar10", functools.partial(datasets.load_cifar10, args.cifar10)
    else:
        name = args.dataset
        loader = datasets.load_digits if name == "digits" else datasets.load_patches
    flatten = args.model == "mlp"  # the conv model takes channel-first images
    return name, loader("train", flatten=flatten), loader("test", flatten=flatten)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average fewer values)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_curves(histories: dict[tuple[str, str], list[History]], path: pathlib.Path) -> None:
    """Training curves, one line per (estimator, init) averaged over seeds, saved as PNG."""
    from matplotlib.figure import Figure  # lazy: matplotlib is not a dependency of rotvq

    panels = (("recon_loss", "reconstruction loss (MSE)", True),
              ("perplexity", "codebook perplexity", False),
              ("mean_z_norm", "mean |z| (encoder output)", False),
              ("mean_q_norm", "mean |q| (chosen code)", False))
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for (estimator, init), runs in histories.items():
        steps = np.asarray(runs[0].step)
        window = max(1, len(steps) // 50)
        for ax, (metric, title, log) in zip(axes, panels):
            mean = np.mean([np.asarray(getattr(h, metric)) for h in runs], axis=0)
            ax.plot(steps, _smooth(mean, window), label=f"{estimator} / {init}")
            ax.set_title(title)
            ax.set_xlabel("step")
            if log:
                ax.set_yscale("log")
    axes[0].legend(title=f"estimator / init (mean of {len(runs)} seed(s))", fontsize="small")
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison described by the command line ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("matplotlib is needed for curves.png: install it "
                         "(pip install matplotlib) or pass --no-plots")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA device")
    try:
        name, train_data, test_data = _load(args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.batch_size > len(train_data.x):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train_data.x)} training "
                     f"examples of {name}")
    args.out.mkdir(parents=True, exist_ok=True)

    combos = list(itertools.product(args.estimators, args.inits, args.seeds))
    rows, histories = [], {}
    history_path = args.out / "history.csv"
    with open(history_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "estimator", "init", "seed", "step", *METRICS])
        for run, (estimator, init, seed) in enumerate(combos):
            config = TrainConfig(
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                device=args.device,
                estimator=estimator, init=init, init_scale=args.init_scale, beta=args.beta,
                gamma=args.gamma, ema=args.ema, dead_code_threshold=args.dead_code_threshold,
                model=args.model, hidden=args.hidden, latent_dim=args.latent_dim,
                codebook_size=args.codebook_size, num_latents=args.num_latents,
                downsamples=args.downsamples, encoder_scale=args.encoder_scale,
                encoder_norm=args.encoder_norm)
            start = time.perf_counter()
            model = build_model(config, train_data)
            history = train(model, train_data, config, progress=args.progress)
            test = evaluate(model, test_data)
            wall = time.perf_counter() - start
            for row in zip(history.step, *(getattr(history, m) for m in METRICS)):
                writer.writerow([run, estimator, init, seed, *row])
            histories.setdefault((estimator, init), []).append(history)
            final = history.final(window=max(1, args.steps // 20))
            rows.append({"run": run, "dataset": name, "estimator": estimator, "init": init,
                         "seed": seed,
                         **{f"train_{k}": v for k, v in final.items()},
                         **{f"test_{k}": v for k, v in test.items()}, "wall_time_s": wall,
                         **{k: v for k, v in dataclasses.asdict(config).items()
                            if k not in ("estimator", "init", "seed")}})
            print(f"[{run + 1}/{len(combos)}] {estimator:<18} {init:<7} seed {seed}: "
                  f"test recon {test['recon_loss']:.4f}  perplexity {test['perplexity']:.1f}  "
                  f"usage {test['usage']:.2f}  ({wall:.1f}s)", flush=True)

    runs_path = args.out / "runs.csv"
    with open(runs_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = [runs_path, history_path]
    if not args.no_plots:
        plot_curves(histories, args.out / "curves.png")
        written.append(args.out / "curves.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
