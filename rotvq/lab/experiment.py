"""Command line: train small VQ-VAEs over a grid of configurations and compare them.

``python -m rotvq.lab.experiment`` (or the console script ``rotvq-experiment``) trains one
small VQ-VAE (:mod:`rotvq.lab.models`) per point of a grid of
:class:`~rotvq.lab.training.TrainConfig` values on one dataset, evaluates each on the
held-out split, and writes into ``--out``:

* ``config.json`` -- the command, the dataset, the world size and every run's full
  :class:`~rotvq.lab.training.TrainConfig` (read one back with ``TrainConfig.from_dict``);
* ``runs.csv`` -- one row per run: ``run``, ``dataset``, ``world_size``, every config field,
  the final training metrics (mean over the last 5 % of the steps) as ``train_*``, the
  test-split metrics of :func:`rotvq.lab.training.evaluate` as ``test_*``, and the wall time;
* ``history.csv`` -- one row per run and step (the :class:`rotvq.lab.training.History`);
* ``curves.png`` -- training curves (reconstruction loss, perplexity, mean ``|z|`` and
  mean ``|q|``), one line per grid point, averaged over seeds.

One schema.  The options are generated from :class:`~rotvq.lab.training.TrainConfig`'s
fields: every field ``foo_bar`` is the flag ``--foo-bar``, typed and range-checked like the
field, with the field's help text.  Every such flag takes one or more values, and the runs
are the Cartesian product of all the values given (nested loops in the fields' order, the
seed innermost): ``--estimator ste rotation --seed 0 1 2`` is six runs.  ``--preset NAME``
sets defaults for any fields (explicit flags win); ``--preset paper`` is the protocol of
Fifty et al.'s VQ-VAE runs (see :data:`PRESETS`).

Data-parallel runs.  Under ``torchrun --nproc_per_node N -m rotvq.lab.experiment ...`` (or
``python -m torch.distributed.run ...``) every rank trains the same run with
:class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL with
``--device cuda``, one GPU per rank); ``--batch-size`` is the global batch, split evenly
over the ranks; only rank 0 evaluates, prints and writes.  A run with N ranks does what one
process does with the same global batch: the same batches, the gradient averaged over the
shards, and the quantizer's statistics synchronised across ranks (by
:class:`rotvq.VectorQuantizer` itself), up to floating-point summation order.  The world
size is recorded in ``config.json`` and ``runs.csv``.

matplotlib is needed only for the plot and is imported only then (``--no-plots`` skips
it).  Run ``python -m rotvq.lab.experiment --help`` for the options and examples.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import itertools
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import datasets
from .._checks import check_positive_int
from .training import History, TrainConfig, build_model, check_field, evaluate, field_type, train

__all__ = ["main", "build_parser", "expand_grid", "smooth", "plot_curves", "PRESETS"]

#: Named sets of defaults for TrainConfig fields (lists are grid axes) and for the data
#: options; ``--preset NAME`` applies one, and explicit flags override it.
PRESETS: dict[str, dict[str, Any]] = {
    # Fifty et al. 2024, official VQ-VAE code (github.com/cfifty/rotation_trick, see
    # book/scaling.ipynb): EMA codebook with decay 0.8, no k-means initialisation
    # (Kaiming-uniform codes: uniform on +-1/sqrt(latent_dim)), commitment weight 1.0, AdamW
    # with lr 1e-4; Euclidean and cosine VQ, STE against the rotation trick.  The model,
    # batch and schedule are rotvq's small convolutional VQ-VAE, not the paper's network;
    # weight decay is not stated there and is 0 here.
    "paper": dict(
        estimator=["ste", "rotation"], distance=["euclidean", "cosine"],
        ema=[True], decay=[0.8], gamma=[1.0], init=["uniform"], init_scale=[32 ** -0.5],
        optimizer=["adamw"], lr=[1e-4], weight_decay=[0.0], dead_code_threshold=[0.0],
        model=["conv"], hidden=[128], latent_dim=[32], codebook_size=[1024], downsamples=[2],
        batch_size=[128], steps=[20000],
    ),
}
_PRESET_HELP = {"paper": "Fifty et al.'s VQ-VAE protocol: STE vs rotation trick, Euclidean and "
                         "cosine VQ, EMA codebook (decay 0.8), commitment weight 1, AdamW lr 1e-4, "
                         "uniform (Kaiming) codes, no k-means; a conv VQ-VAE with 1024 codes of "
                         "size 32, batch 128, 20,000 steps (4 runs). Meant for CIFAR-10 on a GPU"}
# Extra spellings kept for the flags the book and older commands use.
_ALIASES = {"estimator": ["--estimators"], "init": ["--inits"], "seed": ["--seeds"]}
_GROUP_TITLES = {"training": "training", "quantizer": "quantizer (rotvq.VectorQuantizer)",
                 "model": "model (rotvq.lab.models)"}

EPILOG = """\
Every TrainConfig flag takes one or more values; the runs are all their combinations
(nested in the order the flags are listed above, the seed innermost).

examples:
  # STE vs. rotation trick on the embedded digits, 3 seeds (about a minute on a laptop CPU)
  python -m rotvq.lab.experiment --estimator ste rotation --seed 0 1 2 --out runs/digits

  # does k-means initialisation rescue the STE when codes start much shorter than z?
  python -m rotvq.lab.experiment --estimator ste rotation --init normal kmeans \\
      --init-scale 0.01 --out runs/small-codes

  # image patches with the convolutional model, two commitment weights
  python -m rotvq.lab.experiment --dataset patches --model conv --gamma 0.25 1 --out runs/patches

  # the paper's protocol on CIFAR-10 from local files (nothing is downloaded), on a GPU
  python -m rotvq.lab.experiment --preset paper --cifar10 ~/data/cifar-10-batches-py \\
      --device cuda --out runs/paper

  # the same, data-parallel on 4 GPUs (--batch-size is the global batch)
  torchrun --nproc_per_node 4 -m rotvq.lab.experiment --preset paper \\
      --cifar10 ~/data/cifar-10-batches-py --device cuda --out runs/paper-ddp

outputs (in --out): config.json (every run's full configuration), runs.csv (one row per run),
history.csv (one row per run and step), curves.png (training curves; needs matplotlib, skip
with --no-plots).
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    try:
        return value[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        return check_positive_int("the value", int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _field_parser(name: str):
    """Text -> value of the TrainConfig field ``name``, type- and range-checked like the field."""
    base, optional = field_type(name)

    def parse(text: str):
        if optional and text.lower() == "none":
            value = None
        elif base is bool:
            value = _parse_bool(text)
        else:
            try:
                value = base(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        try:
            return check_field(name, value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).replace(f"TrainConfig.{name} ", "")) from None

    parse.__name__ = base.__name__  # argparse names the type in its messages
    return parse


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser, generated from :class:`TrainConfig` (exposed for documentation
    and tests).  ``preset`` sets that preset's values as the defaults."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="rotvq-experiment",
        description="Train small VQ-VAEs for every combination of the given settings (gradient "
                    "estimator, codebook initialisation, seed, or any other field); write every "
                    "run's configuration, a CSV of results, the per-step histories and a plot "
                    "of the training curves.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="; ".join(f"{k}: {v}" for k, v in _PRESET_HELP.items()))
    data = parser.add_argument_group("data (default: the embedded digits)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=("digits", "patches"), default="digits",
                        help="embedded dataset: 8x8 handwritten digits or 8x8 RGB photo patches")
    source.add_argument("--mnist", metavar="ROOT", help="folder with the MNIST IDX files")
    source.add_argument("--cifar10", metavar="ROOT",
                        help="folder with cifar-10-batches-py (or that folder itself)")

    groups = {key: parser.add_argument_group(title) for key, title in _GROUP_TITLES.items()}
    for field in dataclasses.fields(TrainConfig):
        meta, (base, optional) = field.metadata, field_type(field.name)
        default = getattr(defaults, field.name)
        kwargs: dict[str, Any] = dict(dest=field.name, nargs="+", type=_field_parser(field.name),
                                      default=None, metavar=field.name.upper())
        if base is bool:  # `--ema` alone means true; `--ema true false` is a grid
            kwargs.update(nargs="*", metavar="{true,false}")
        if base is float and optional:
            kwargs["metavar"] = f"{field.name.upper()}|none"
        help_text = meta["help"]
        if meta["choices"] is not None:
            help_text += f"; one of: {', '.join(meta['choices'])}"
        help_text += f" (default: {'none' if default is None else default})"
        groups[meta["group"]].add_argument(_flag(field.name), *_ALIASES.get(field.name, ()),
                                           help=help_text, **kwargs)

    other = parser.add_argument_group("run")
    other.add_argument("--threads", type=_positive_int, metavar="N",
                       help="torch CPU threads per process (default: torch's choice)")
    other.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/experiment"),
                       help="output folder, created if needed (default: %(default)s)")
    other.add_argument("--no-plots", action="store_true",
                       help="skip curves.png (no matplotlib needed)")
    other.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: only on a terminal, long runs)")
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    return parser


def expand_grid(axes: dict[str, Sequence[Any]], base: TrainConfig | None = None) -> list[TrainConfig]:
    """Every combination of the values in ``axes`` (field name -> values), as configs.

    Fields not in ``axes`` keep ``base``'s value (default ``TrainConfig()``).  The order is
    that of nested loops over the axes in :class:`TrainConfig`'s field order, with ``seed``
    innermost.

    >>> [(c.estimator, c.seed) for c in expand_grid({"seed": [0, 1], "estimator": ["ste", "rotation"]})]
    [('ste', 0), ('ste', 1), ('rotation', 0), ('rotation', 1)]
    """
    base = base or TrainConfig()
    order = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed"] + ["seed"]
    unknown = sorted(set(axes) - set(order))
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
    names = [name for name in order if name in axes]
    for name in names:
        if isinstance(axes[name], (str, bytes)) or not len(axes[name]):
            raise ValueError(f"axis {name!r} needs a non-empty sequence of values, got {axes[name]!r}")
    return [dataclasses.replace(base, **dict(zip(names, values)))
            for values in itertools.product(*(axes[name] for name in names))]


def _load(args) -> tuple[str, datasets.LabeledData, datasets.LabeledData]:
    """(name, train split, test split) of the dataset the command line selects."""
    if args.mnist:
        name, loader = "mnist", functools.partial(datasets.load_mnist, args.mnist)
    elif args.cifar10:
        name, loader = "cifar10", functools.partial(datasets.load_cifar10, args.cifar10)
    else:
        name = args.dataset
        loader = datasets.load_digits if name == "digits" else datasets.load_patches
    models = set(args.model or [TrainConfig().model])
    if len(models) > 1:
        raise ValueError("--model takes one value per command: mlp and conv need different "
                         "input layouts")
    flatten = models == {"mlp"}  # the conv model takes channel-first images
    return name, loader("train", flatten=flatten), loader("test", flatten=flatten)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average fewer values)."""
    cumulative = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_curves(histories: dict[str, list[History]], path: pathlib.Path) -> None:
    """Training curves, one line per label (e.g. a grid point) averaged over its histories
    (e.g. seeds), saved as PNG."""
    from matplotlib.figure import Figure  # lazy: matplotlib is not a dependency of rotvq

    panels = (("recon_loss", "reconstruction loss (MSE)", True),
              ("perplexity", "codebook perplexity", False),
              ("z_norm", "mean |z| (encoder output)", False),
              ("q_norm", "mean |q| (chosen code)", False))
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for label, runs in histories.items():
        steps = np.asarray(runs[0].step)
        window = max(1, len(steps) // 50)
        for ax, (metric, title, log) in zip(axes, panels):
            mean = np.mean([np.asarray(h[metric]) for h in runs], axis=0)
            ax.plot(steps, smooth(mean, window), label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            if log:
                ax.set_yscale("log")
    axes[0].legend(title=f"mean of {len(runs)} seed(s)", fontsize="small")
    fig.savefig(path, dpi=100)


def _start_process_group(device: str) -> tuple[int, int]:
    """``(rank, world_size)``; initialises the default process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(minutes=10))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison described by the command line ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS))
    preset = first.parse_known_args(argv)[0].preset
    parser = build_parser(preset)
    args = parser.parse_args(argv)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    axes = {}
    for name in fields:
        values = getattr(args, name)
        if values is not None:
            axes[name] = [True] if values == [] else list(dict.fromkeys(values))  # bare --ema
    try:
        configs = expand_grid(axes)
    except ValueError as error:
        parser.error(str(error))
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("matplotlib is needed for curves.png: install it "
                         "(pip install matplotlib) or pass --no-plots")
    if args.threads:
        torch.set_num_threads(args.threads)
    for device_text in {c.device for c in configs}:
        try:
            device = torch.device(device_text)
        except RuntimeError as error:
            parser.error(f"--device: {error}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: this torch build or machine has no CUDA device")
    try:
        name, train_data, test_data = _load(args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    n_train = len(train_data.x)
    for batch_size in {c.batch_size for c in configs}:
        if batch_size > n_train:
            parser.error(f"--batch-size {batch_size} exceeds the {n_train} training examples "
                         f"of {name}")
    if len({c.device for c in configs}) > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--device takes one value in a data-parallel run")
    rank, world = _start_process_group(configs[0].device)
    try:
        for batch_size in {c.batch_size for c in configs}:
            if batch_size % world:
                parser.error(f"--batch-size {batch_size} (the global batch) is not divisible by "
                             f"the {world} processes")
        return _run(args, argv, preset, name, train_data, test_data, configs, axes, rank, world)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, argv, preset, name, train_data, test_data, configs, axes, rank, world) -> int:
    """Train and evaluate every config; rank 0 writes the outputs."""
    lead = rank == 0
    varied = [k for k in axes if k != "seed" and len(axes[k]) > 1]
    if lead:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"command": ["rotvq-experiment", *argv], "preset": preset, "dataset": name,
                  "world_size": world, "threads": torch.get_num_threads(),
                  "torch": torch.__version__,
                  "runs": [{"run": i, "config": c.to_dict()} for i, c in enumerate(configs)]}
        (args.out / "config.json").write_text(json.dumps(record, indent=1) + "\n")
    rows, histories = [], {}
    history_path = args.out / "history.csv"
    handle = open(history_path, "w", newline="") if lead else None
    try:
        writer = None
        for run, config in enumerate(configs):
            start = time.perf_counter()
            model = build_model(config, train_data)
            history = train(model, train_data, config, progress=args.progress)
            if not lead:
                continue
            test = evaluate(model, test_data)  # eval mode: no collectives, rank 0 alone
            wall = time.perf_counter() - start
            point = {k: getattr(config, k) for k in varied}
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=["run", *varied, "seed", "step",
                                                            *history.names])
                writer.writeheader()
            for step_row in history.rows():
                writer.writerow({"run": run, **point, "seed": config.seed, **step_row})
            label = ", ".join(f"{k}={v}" for k, v in point.items()) or config.estimator
            histories.setdefault(label, []).append(history)
            final = history.final(window=max(1, config.steps // 20))
            rows.append({"run": run, "dataset": name, "world_size": world, **config.to_dict(),
                         **{f"train_{k}": v for k, v in final.items()},
                         **{f"test_{k}": v for k, v in test.items()}, "wall_time_s": wall})
            shown = dict.fromkeys(["estimator", "init", *varied, "seed"])  # always name the run
            where = ", ".join(f"{k}={getattr(config, k)}" for k in shown)
            print(f"[{run + 1}/{len(configs)}] {where}: test recon_loss {test['recon_loss']:.4f}  "
                  f"perplexity {test['perplexity']:.1f}  usage {test['usage']:.2f}  ({wall:.1f}s)",
                  flush=True)
    finally:
        if handle is not None:
            handle.close()
    if not lead:
        return 0
    runs_path = args.out / "runs.csv"
    with open(runs_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = [args.out / "config.json", runs_path, history_path]
    if not args.no_plots:
        plot_curves(histories, args.out / "curves.png")
        written.append(args.out / "curves.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
