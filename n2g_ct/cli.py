"""The ``n2g-ct`` command line: parse arguments, call one library function per command.

Heavy imports (torch, pydicom codecs, matplotlib) happen inside the commands, so ``--help`` is fast.
Errors a user can act on (:class:`n2g_ct.errors.N2GError`) print one message and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from n2g_ct import __version__
from n2g_ct.errors import ConfigError, N2GError
from n2g_ct.log_file import command_log

log = logging.getLogger("n2g_ct")

EXIT_USER_ERROR = 2


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from n2g_ct.io.summary import describe_path, describe_records

    if args.json:
        records = describe_records(args.path, allow_non_ct=args.allow_non_ct,
                                   assume_identity_rescale=args.assume_identity_rescale)
        print(json.dumps(records, indent=2))
    else:
        print(describe_path(args.path, allow_non_ct=args.allow_non_ct,
                            assume_identity_rescale=args.assume_identity_rescale))
    return 0


def _add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe the CT series / NIfTI volumes found at a path (no patient data shown)",
        description="List each series found: slices, modality, size, spacing, HU range, transfer syntax.",
    )
    parser.add_argument("path", type=Path, help="DICOM file, series folder, folder tree, or NIfTI file")
    parser.add_argument("--allow-non-ct", action="store_true", help="also read series whose modality is not CT")
    parser.add_argument("--json", action="store_true", help="machine-readable output: one JSON document")
    _add_rescale_option(parser)
    parser.set_defaults(handler=_cmd_info)


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")


def _cmd_models(args: argparse.Namespace) -> int:
    from n2g_ct.models import NAMED_MODELS
    from n2g_ct.models.checkpoint import file_sha256

    for name, (path, description) in NAMED_MODELS.items():
        print(f"{name}: {description}\n  {path} ({path.stat().st_size / 2**20:.1f} MiB, sha256 {file_sha256(path)[:12]})")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    import shutil

    from n2g_ct.datasets.cache import find_caches, folder_bytes

    roots = list(args.paths) or [Path.cwd()] + ([Path(os.environ["N2G_CT_CACHE"])] if os.environ.get("N2G_CT_CACHE") else [])
    caches = find_caches([r for r in roots if r.exists()])
    if not caches:
        print(f"no n2g-ct cache in {', '.join(map(str, roots))}")
        return 0
    for cache in caches:
        size = folder_bytes(cache) / 1e6
        if args.action == "clear":
            shutil.rmtree(cache)
            print(f"removed {cache} ({size:.1f} MB)")
        else:
            print(f"{cache}: {size:.1f} MB")
    return 0


def _add_cache_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache", help="list or remove the HU caches (copies of input images) below folders",
        description="Training and pipeline runs cache each series as an HU array under their output folder "
        "(RUN/cache) or $N2G_CT_CACHE. These are copies of the input images: list them, and clear them when done.")
    parser.add_argument("action", choices=["list", "clear"])
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                        help="folders searched for caches (default: the current folder and $N2G_CT_CACHE)")
    parser.set_defaults(handler=_cmd_cache)


def _add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the named models that ship with n2g-ct (--model NAME)",
                                   description="Models usable by name wherever a checkpoint is asked for.")
    parser.set_defaults(handler=_cmd_models)


def _add_rescale_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assume-identity-rescale", action="store_true",
                        help="read CT images that lack RescaleSlope/RescaleIntercept as stored value = HU "
                        "(default: such a file is an error, its HU being unknown)")


def _cmd_manifest_scan(args: argparse.Namespace) -> int:
    from n2g_ct.datasets.scan import scan_dataset

    summary = scan_dataset(args.dataset, args.root, args.out, splits=args.split, seed=args.seed, force=args.force)
    print(summary.render())
    return 0


def _cmd_manifest_check(args: argparse.Namespace) -> int:
    from n2g_ct.datasets.check import check_manifest

    report = check_manifest(args.manifest, args.data_root)
    print(report.render())
    if not report.ok:
        print(f"n2g-ct manifest check: {len(report.problems)} problem(s) in {args.manifest}", file=sys.stderr)
        return 1
    return 0


def _add_manifest_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "manifest",
        help="make and validate dataset manifests (which slices form the noisy, clean and test sets)",
        description="Dataset manifests; schema in data_manifests/README.md.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    scan = actions.add_parser(
        "scan",
        help="walk a dataset tree (e.g. Mayo 2016) and write its concrete manifest",
        description="Detect the layout, pair low-dose and reference slices by position, build the splits "
        "and write every slice (file + position) per split and role. Reads DICOM headers only.",
    )
    scan.add_argument("dataset", help="dataset definition: a name in data_manifests/ (mayo2016) or a YAML path")
    scan.add_argument("--root", type=Path, required=True, help="the dataset folder")
    scan.add_argument("--out", type=Path, required=True, help="manifest YAML to write (outside --root)")
    scan.add_argument("--split", nargs="+", metavar="NAME",
                      help="splits to build (default: all; mayo2016: paper patient)")
    scan.add_argument("--seed", type=int, help="seed of the random split (default: the definition's)")
    scan.add_argument("--force", action="store_true", help="replace --out if it exists")
    scan.set_defaults(handler=_cmd_manifest_scan)
    check = actions.add_parser(
        "check",
        help="validate a manifest: files, slice indices, counts per patient and role, disjoint roles",
        description="Print a summary table per split; exit 1 listing the problems if any.",
    )
    check.add_argument("manifest", type=Path, help="manifest YAML")
    check.add_argument("--data-root", type=Path,
                       help="folder relative paths resolve against (default: the manifest's root)")
    check.set_defaults(handler=_cmd_manifest_check)


def _cmd_train(args: argparse.Namespace) -> int:
    from n2g_ct.config import config_template, load_config
    from n2g_ct.training.config import TrainConfig
    from n2g_ct.training.loop import HarmfulModel, TrainingInterrupted, train

    if args.print_config:
        print(f"# n2g-ct {__version__} training configuration: every setting at its default.\n"
              "# Fill data.noisy and data.clean (or data.manifest + data.split), then: n2g-ct train THIS.yaml\n"
              + config_template(TrainConfig))
        return 0
    if args.config is None:
        raise ConfigError("train needs a CONFIG (YAML); n2g-ct train --print-config writes a template")
    overrides = list(args.overrides) + ([f"run.device={args.device}"] if args.device else [])
    overrides += [f"run.threads={args.threads}"] if args.threads else []
    config = load_config(TrainConfig, args.config, overrides)
    try:
        main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 keeps the log
        with command_log(config.run.out_dir / "train.log") if main_process else contextlib.nullcontext():
            checkpoint = train(config, resume=args.resume, progress=not args.no_progress)
    except TrainingInterrupted as exc:
        print(f"n2g-ct train: {exc}; continue with --resume", file=sys.stderr)
        return 128 + exc.signum
    except HarmfulModel as exc:
        print(f"n2g-ct train: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        print(f"checkpoint: {checkpoint}")
    return 0


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a denoiser (Noise2Grad, or a supervised / Noise2Noise baseline) from a YAML config",
        description="Train as configured in CONFIG; later KEY=VALUE arguments override it "
        "(dotted keys, e.g. optim.steps=2000 run.out_dir=runs/x). Under torchrun it trains on every process.",
    )
    parser.add_argument("config", type=Path, nargs="?", help="training configuration (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print a commented template of every setting at its default, and exit")
    parser.add_argument("--resume", action="store_true", help="continue the run in run.out_dir from its last checkpoint")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides run.device)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (overrides run.threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_cmd_train)


def _cmd_denoise(args: argparse.Namespace) -> int:
    from n2g_ct.devices import torchrun_processes
    from n2g_ct.inference.denoise import Part, denoise_inputs

    processes, part = torchrun_processes(), Part.parse(args.part) if args.part else Part()
    if processes.world_size > 1:
        if args.part:
            raise ConfigError("--part and torchrun both split the work: use one of them")
        part = Part.of_processes(processes)
        if args.threads is None:  # the node's cores shared among its processes
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    log_name = "denoise.log" if part.count == 1 else f"denoise.part-{part.number}-of-{part.count}.log"
    with command_log(args.out / log_name):
        summary = denoise_inputs(
            args.inputs, args.out, args.model, split=args.split, device=args.device, batch_size=args.batch_size,
            precision="fp32" if args.no_amp else args.precision, overwrite=args.overwrite, force=args.force, progress=not args.no_progress,
            include_localizers=args.include_localizers, assume_identity_rescale=args.assume_identity_rescale,
            output_format=args.format, part=part, processes=processes,
        )
    print(summary.render())
    return 0 if summary.ok else 1


def _add_denoise_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "denoise",
        help="denoise CT series / NIfTI volumes into derived DICOM series / NIfTI files",
        description="Denoise every series found in the inputs with a trained model. Outputs mirror the "
        "inputs below --out (written to a temporary folder, then renamed); completed ones are skipped on a "
        "re-run; OUT/denoise_summary.csv lists each job. Every series is self-checked without a reference (HU shift "
        "in soft tissue, power removed against the series' own noise, removal at edges); a series on which the "
        "model fails is refused (nothing written) unless --force. "
        "Exit status: 0 all done, 1 some refused or failed, 2 bad arguments.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="series folder, folder tree, DICOM file, NIfTI file, or manifest (.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside every input)")
    parser.add_argument("--model", help="a named model (n2g-ct models) or a checkpoint written by n2g-ct train or "
                        "export (default: starter, trained on simulated quarter-dose chest CT; see the README's model card)")
    parser.add_argument("--format", choices=["dicom", "nifti"], default="dicom",
                        help="output of DICOM input: derived DICOM series (default) or NIfTI (.nii.gz; needs a "
                        "regular slice grid); NIfTI input always gives NIfTI")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--split", help="manifest split whose low-dose series are denoised (default: its default)")
    parser.add_argument("--overwrite", action="store_true", help="redo series whose output exists")
    parser.add_argument("--include-localizers", action="store_true",
                        help="denoise localizers/scouts too (default: listed as skipped, they are not axial slices)")
    _add_rescale_option(parser)
    parser.add_argument("--force", action="store_true",
                        help="write a series even when the model fails the self-check on it (the summary says so)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="auto (default): float16 on CUDA; on a CPU bfloat16 where it has AMX-BF16 or "
                        "AVX512-BF16 (the full-resolution level stays float32), else float32. Recorded in each "
                        "derived series' DerivationDescription")
    parser.add_argument("--no-amp", action="store_true", help="the same as --precision fp32")
    parser.add_argument("--part", metavar="K/N", help="denoise part K of N (e.g. 2/8) of the series, split the same way "
                        "by every part; the part that completes the set writes the merged summary. Under torchrun "
                        "each rank takes one part by itself")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    _add_threads_option(parser)
    parser.set_defaults(handler=_cmd_denoise)


def _cmd_export(args: argparse.Namespace) -> int:
    from n2g_ct.models.checkpoint import export_model, file_sha256

    exported = export_model(args.checkpoint, args.out)
    print(f"{args.out}: {exported['config']['method']['name']} model after {exported['step']} steps, "
          f"{args.out.stat().st_size / 2**20:.1f} MiB, sha256 {file_sha256(args.out)[:12]}")
    return 0


def _add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write an inference-only copy of a checkpoint (weights and settings; no optimiser or data paths)",
        description="Copy the denoiser's weights and the settings needed to apply them into OUT, dropping the "
        "optimiser state, the noise approximator and the training data paths: small and safe to share. "
        "n2g-ct denoise --model and evaluate --model read it like a training checkpoint.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by n2g-ct train")
    parser.add_argument("--out", type=Path, required=True, help="the exported model (.pt)")
    parser.set_defaults(handler=_cmd_export)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from n2g_ct.datasets.selection import PairSelection
    from n2g_ct.evaluation.evaluate import ModelSpec, RoiSettings, evaluate, evaluate_split

    roi = RoiSettings() if args.roi_size is None else RoiSettings(size_px=args.roi_size)
    options = {
        "models": [ModelSpec.parse(text) for text in args.model], "bm3d": args.bm3d, "max_slices": args.max_slices,
        "examples": args.examples, "roi": roi, "device": args.device, "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }
    with command_log(args.out.parent / f"{args.out.name}.log", output=args.out):
        if args.manifest is not None:
            result = evaluate_split(args.manifest, args.split, args.out, data_root=args.data_root, **options)
        else:
            result = evaluate([PairSelection(Path(low), Path(ref)) for low, ref in args.pair], args.out, **options)
    print(result.render())
    return 0


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="paired evaluation: PSNR/SSIM (two windows), ROI noise, HU bias and NPS; CSV, JSON, Markdown/HTML report",
        description="Score the noisy input, each --model and optionally BM3D against the reference slices of a "
        "manifest's test split or of --pair series. Writes OUT/per_slice.csv, summary.json (with the protocol and "
        "checkpoint hashes), report.md and report.html; the folder appears only when complete.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="manifest YAML whose split's test pairs are evaluated")
    source.add_argument("--pair", nargs=2, action="append", metavar=("LOW", "REF"),
                        help="a low-dose series and its reference series (repeatable)")
    parser.add_argument("--split", help="manifest split (default: the manifest's default or only split)")
    parser.add_argument("--data-root", type=Path, help="folder the manifest's relative paths resolve against")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a denoiser to evaluate under NAME (repeatable); CHECKPOINT may be a named model (n2g-ct models)")
    parser.add_argument("--bm3d", action="store_true",
                        help="add BM3D with an estimated and an oracle noise PSD (needs: pip install 'n2g-ct[bm3d]')")
    parser.add_argument("--max-slices", type=int, help="evaluate this many slices, evenly spaced (quick runs)")
    parser.add_argument("--examples", type=int, default=2, help="slices shown side by side in the report (default: 2)")
    parser.add_argument("--roi-size", type=int, help="uniform-ROI side in pixels, a multiple of 4 (default: 16)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="where denoisers run: auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_threads_option(parser)
    parser.set_defaults(handler=_cmd_evaluate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from n2g_ct.simulation.projector import ScanGeometry
    from n2g_ct.simulation.series import simulate_series

    geometry = ScanGeometry(args.geometry, views=args.views, filter=args.filter)
    with command_log(args.out.parent / f"{args.out.name}.log", output=args.out):
        result, written = simulate_series(
            args.input, args.out, args.dose, geometry=geometry, i0=args.i0, electronic_noise=args.electronic_noise,
            seed=args.seed, device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
        )
    print(f"{written}: {result.describe()}")
    return 0


def _add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulate a lower-dose scan of a routine-dose series (projection-domain noise) as a derived series",
        description="HU -> attenuation (mu_water 0.0192/mm), forward projection, counts Poisson(I0*dose*exp(-p)) "
        "+ N(0, sigma_e^2), log, filtered back-projection; only the noise difference FBP(noisy) - FBP(noiseless) "
        "is added to the source, so its own noise is kept. Without --i0, I0 is calibrated per slice so that the "
        "added noise is sqrt(1/dose - 1) x the slice's own noise (uniform soft-tissue windows). DICOM in: a derived "
        "DICOM series in OUT; NIfTI in: OUT/<name>. Details: n2g_ct/simulation/low_dose.py.",
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="routine-dose DICOM series folder or NIfTI file")
    parser.add_argument("--dose", type=float, required=True, help="fraction of the source's dose, e.g. 0.25")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty, outside INPUT)")
    parser.add_argument("--geometry", choices=["fan", "parallel"], default="fan",
                        help="fan: equi-angular, source-isocentre 595 mm, source-detector 1085.6 mm, views over "
                        "360deg; parallel: views over 180deg (default: fan)")
    parser.add_argument("--views", type=int, help="views per scan, >= 720 (default: 1152 fan, 720 parallel)")
    parser.add_argument("--filter", choices=["hann", "ramp"], default="hann", help="FBP filter (default: hann)")
    parser.add_argument("--i0", type=float, help="incident photons per ray at dose 1 for every slice "
                        "(default: calibrated per slice from the source's noise)")
    parser.add_argument("--electronic-noise", type=float, default=10.0, help="electronic noise std in counts (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, help="slices at once (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_threads_option(parser)
    parser.set_defaults(handler=_cmd_simulate)


def _budget(text: str):
    from n2g_ct.training.config import Budget

    try:
        return Budget.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_run(args: argparse.Namespace) -> int:
    from n2g_ct.pipeline import load_recipe, run_pipeline

    out = args.out or Path("runs") / args.recipe.stem
    recipe = load_recipe(args.recipe, data_root=args.data_root, out=out, overrides=tuple(args.overrides))
    with command_log(out / "run.log"):
        result = run_pipeline(recipe, out, budget=args.budget, device=args.device,
                              progress=not args.no_progress, overwrite=args.overwrite)
    print(result.render())
    return 0


def _add_run_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a pipeline recipe (pipelines/*.yaml): simulate, train, evaluate, report",
        description="Run RECIPE into --out; finished steps are skipped and interrupted training resumes, "
        "so the same command continues a run. KEY=VALUE arguments override recipe entries (dotted keys).",
    )
    parser.add_argument("recipe", type=Path, help="pipeline recipe (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--data-root", type=Path, help="folder that {data_root} in the recipe stands for")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/RECIPE-NAME)")
    parser.add_argument("--budget", type=_budget, metavar="BUDGET",
                        help="training per model: minutes (20, 20min) or optimiser steps (3000steps); the "
                        "learning-rate schedule and a relative update-delay period scale with it")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="redo the evaluation if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_option(parser)
    parser.set_defaults(handler=_cmd_run)


def _cmd_demo(args: argparse.Namespace) -> int:
    from n2g_ct.demo import run_demo

    with command_log(args.out / "demo.log"):
        result = run_demo(args.out, minutes=args.minutes, device=args.device, progress=not args.no_progress,
                          overwrite=args.overwrite)
    print(result.render())
    return 0


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole chain on a built-in phantom (no downloaded data): simulate, train, evaluate, denoise",
        description="Write a procedural chest phantom series, simulate quarter dose, train Noise2Grad for "
        "--minutes, evaluate on held-out slices and denoise the low-dose series into a derived DICOM series.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--minutes", type=float, default=3.0, help="Noise2Grad training time (default: 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train, evaluate and denoise again when OUT already holds a demo")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_option(parser)
    parser.set_defaults(handler=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The full ``n2g-ct`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="n2g-ct",
        description="Noise2Grad denoising for low-dose CT: train without paired scans, denoise DICOM, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"n2g-ct {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info_parser(subparsers)
    _add_manifest_parser(subparsers)
    _add_train_parser(subparsers)
    _add_denoise_parser(subparsers)
    _add_export_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_simulate_parser(subparsers)
    _add_run_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_models_parser(subparsers)
    _add_cache_parser(subparsers)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pydicom logs each of its warnings too (one line, logger "pydicom"); the duplicate Python
    # warning would print a source line under it.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``n2g-ct``; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may also follow options
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    _configure_logging(args.verbose, args.quiet)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            parser.error(f"--threads must be ≥ 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args))
    except N2GError as exc:
        print(f"n2g-ct {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # permissions, a file where a folder should be, a full disk: name the path
        where = exc.filename or "(no path)"
        problem = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            in_the_way = next((p for p in (Path(where), *Path(where).parents) if p.is_file()), None)
            if in_the_way is not None:
                where, problem = in_the_way, "is a file where a folder is needed"
        print(f"n2g-ct {args.command}: error: {where}: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"n2g-ct {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
