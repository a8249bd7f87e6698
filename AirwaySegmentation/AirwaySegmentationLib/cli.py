"""The ``airway`` console command.

Each subcommand is a thin shell over one Python function that batch scripts can call
directly (named in the subcommand's help).  Bad input ends with one sentence on stderr and
exit status 2; an interrupted run exits with 130 and leaves no partial output file (``train``
keeps its last finished epoch, which the same command resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .classes import DEFAULT_SEGMENTAL_GENERATION
from .errors import AirwayInputError
from .inference_settings import BLENDINGS, CUDA_BATCH_SIZE, PRECISIONS, InferenceSettings
from .progress import Cancelled, TextProgressBar

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Packages of the optional extras (pyproject.toml) and the extra that brings each.
_DISTRIBUTION = "slicer-airway"
_OPTIONAL_PACKAGES = {"torch": "torch", "safetensors": "torch", "tomli": "torch", "matplotlib": "report"}


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import generate_phantom, write_phantom

    phantom = generate_phantom(
        seed=args.seed,
        shape_zyx=tuple(args.shape),
        spacing_zyx=tuple(args.spacing) if args.spacing else None,
        variant=args.variant,
        progress=TextProgressBar(),
    )
    paths = write_phantom(phantom, args.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    from .jobs import label_airway_file

    tree = label_airway_file(
        args.input,
        args.out,
        connectivity=args.connectivity,
        segmental_generation=args.segmental_generation,
        branches_path=args.branches,
        progress=TextProgressBar(),
    )
    per_class = {c: sum(1 for b in tree.branches if b.airway_class == c) for c in (1, 2, 3)}
    generations = max((b.generation for b in tree.branches), default=-1) + 1
    print(
        f"{len(tree.branches)} branches over {generations} generations "
        f"(class 1: {per_class[1]}, class 2: {per_class[2]}, class 3: {per_class[3]}) -> {args.out}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs import evaluate_airway_files, write_json

    metrics = evaluate_airway_files(args.pred, args.gt, tree_json_path=args.tree, mode=args.mode)
    if args.json == "-":
        print(json.dumps(metrics.as_dict(), indent=2))
        return 0
    print(metrics.table())
    if args.json:
        write_json(metrics.as_dict(), args.json)
        print(f"metrics written to {args.json}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train
    from .train_config import load_config

    config = load_config(args.config)
    task = None  # stage 1
    if config.task == "connection":
        from AirwayRefineLib.connect_training import ConnectionTask

        task = ConnectionTask()
    result = train(
        config, args.out, progress=TextProgressBar(), resume=not args.no_resume, init=args.init,
        command=args.command_line, task=task,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 speaks for the run
    name = "reconnected - false bridges (%)" if config.task == "connection" else "mean ATM'22 score"
    score = "no validation volumes" if result.best_score is None else f"{name} {result.best_score:.2f}"
    print(
        f"{result.epochs} epochs, {result.iterations} iterations; best model (epoch {result.best_epoch}, {score}) "
        f"-> {result.best_model}"
    )
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .segment import segment_files

    settings = InferenceSettings(
        overlap=args.overlap,
        max_window_zyx=None if args.max_window == 0 else (args.max_window,) * 3,
        blending=args.blending,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        mirror=args.mirror,
        threads=args.threads,
    )
    summary = segment_files(
        args.input, args.out, args.model, settings, shard=args.shard, keep_probability=args.probability,
        keep_largest_component=not args.all_components, connectivity=args.connectivity, progress=TextProgressBar(),
    )
    print(f"{summary.describe()} -> {args.out}")
    for name, message in summary.failed:
        print(f"  failed: {name}: {message}", file=sys.stderr)
    return summary.exit_code


def _connect_choice(text: str) -> str | list[int]:
    """``--connect``: "all", "none" or comma-separated break ids."""
    if text in ("all", "none"):
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise AirwayInputError(f"--connect takes all, none or break ids like 1,3,4, not {text!r}.") from None


def _cmd_refine(args: argparse.Namespace) -> int:
    from AirwayRefineLib.refine import refine_file

    settings = _engine_settings(args)
    result = refine_file(args.ct, args.labels, args.out, args.model, settings, connect=_connect_choice(args.connect),
                         progress=TextProgressBar())
    found = len(result.prediction.breaks)
    print(
        f"{result.prediction.components_before} components, {found} breaks found, "
        f"{sum(b.connected for b in result.prediction.breaks)} bridged, {len(result.merged_ids)} merged; "
        f"{result.components_after} components after the merge -> {args.out}"
    )
    return 0


def _print_run(result) -> None:
    summary = result.summary
    print(
        f"{summary['components_before']} components, {summary['breaks_found']} breaks found, "
        f"{summary['breaks_merged']} connected; {summary['branches']} branches; "
        f"{summary['timings_s']['total']:.1f} s on {summary['device']}"
    )
    for name in result.outputs:
        print(f"  {result.out_dir / name}")
    if "report" in summary:
        print(f"  report {summary['report']}")


def _cmd_run(args: argparse.Namespace) -> int:
    from AirwayRefineLib.pipeline import run_pipeline

    settings = _engine_settings(args)
    result = run_pipeline(
        args.input, args.out, model=args.model, connection_model=args.connection_model, settings=settings,
        connect=_connect_choice(args.connect), make_report=not args.no_report, progress=TextProgressBar(),
    )
    _print_run(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from AirwayRefineLib.pipeline import run_demo

    settings = _engine_settings(args)
    result = run_demo(args.out, seed=args.seed, shape_zyx=tuple(args.shape), settings=settings, progress=TextProgressBar())
    print(f"demo phantom (CT and ground truth): {args.out / 'phantom'}")
    _print_run(result)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from AirwayRefineLib.pipeline import report_folder

    png, html = report_folder(args.run_dir)
    print(f"{png}\n{html}")
    return 0


def _cmd_centerline(args: argparse.Namespace) -> int:
    from AirwayRefineLib.centerline import centerline_file

    tree, paths = centerline_file(args.labels, args.out, progress=TextProgressBar())
    generations = max((b.generation for b in tree.branches), default=-1) + 1
    print(f"{len(tree.branches)} branches over {generations} generations -> " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    from AirwayRefineLib.centerline import route_file

    route, paths = route_file(args.centerlines, args.target, args.out)
    print(
        f"{' > '.join(route.names)}: {route.length_mm:.1f} mm along the airway, narrowest radius "
        f"{route.min_radius_mm:.2f} mm, ends {route.distance_to_target_mm:.1f} mm from the target -> "
        + ", ".join(str(p) for p in paths)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``airway`` command (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="airway",
        description="Airway tree segmentation in chest CT: phantoms, tree labels, evaluation, training, "
        "segmentation (stage 1), break connection (stage 2), centerlines and routes, the whole pipeline (airway run).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = commands.add_parser(
        "phantom",
        help="generate a synthetic chest CT with exact airway ground truth",
        description="Generate a synthetic chest CT (ct.nii.gz) with its exact airway lumen (airway.nii.gz), "
        "three-class labels (airway3.nii.gz), lungs (lungs.nii.gz) and branch table (tree.json). "
        "Python: AirwaySegmentationLib.phantom.generate_phantom + write_phantom.",
    )
    phantom.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same phantom")
    phantom.add_argument("--shape", type=int, nargs=3, default=(256, 256, 256), metavar=("Z", "Y", "X"))
    phantom.add_argument(
        "--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
        help="voxel size in mm (default: 0.8 in-plane, slice spacing from the variant)",
    )
    phantom.add_argument("--variant", default="standard", help="scanner variant (see the phantom module for the list)")
    phantom.add_argument("--out", required=True, type=Path, help="output folder")
    phantom.set_defaults(run=_cmd_phantom)

    labels = commands.add_parser(
        "labels",
        help="three-class labels from a binary airway mask",
        description="Parse a binary airway mask into a branch tree and write the three anatomy-aware classes "
        "(1 trachea + main bronchi, 2 lobar to segmental, 3 smaller). The output format follows the name: "
        ".nii.gz, .nrrd, .mha or .seg.nrrd (Slicer segmentation with named, SNOMED-coded segments). "
        "Python: AirwaySegmentationLib.jobs.label_airway_file.",
    )
    labels.add_argument("--in", dest="input", required=True, type=Path, help="binary airway mask")
    labels.add_argument("--out", required=True, type=Path, help="three-class label file")
    labels.add_argument("--connectivity", type=int, choices=(6, 26), default=26)
    labels.add_argument(
        "--segmental-generation", type=int, default=DEFAULT_SEGMENTAL_GENERATION,
        help="deepest generation that is still class 2 (default %(default)s)",
    )
    labels.add_argument("--branches", type=Path, default=None, help="also write the branch table as JSON here")
    labels.set_defaults(run=_cmd_labels)

    evaluate = commands.add_parser(
        "evaluate",
        help="ATM'22 metrics of a predicted airway against a reference",
        description="Tree length detected (TD), branches detected (BD), Dice, precision, ATM'22 score, clDice, "
        "Betti-0 error, component count, FPR and per-class TD/BD. "
        "Python: AirwaySegmentationLib.jobs.evaluate_airway_files.",
    )
    evaluate.add_argument("--pred", required=True, type=Path, help="predicted airway (nonzero = airway)")
    evaluate.add_argument("--gt", required=True, type=Path, help="reference airway (binary or three-class)")
    evaluate.add_argument("--tree", type=Path, default=None, help="phantom tree.json giving the reference classes")
    evaluate.add_argument(
        "--mode", choices=("atm22", "atm26"), default="atm22",
        help="largest component 6-connected (atm22) or 26-connected (atm26)",
    )
    evaluate.add_argument("--json", default=None, help="write the metrics as JSON to this file ('-' for stdout only)")
    evaluate.set_defaults(run=_cmd_evaluate)

    train = commands.add_parser(
        "train",
        help="train a stage-1 airway network or the stage-2 connection network from a TOML configuration",
        description="Train a stage-1 network (WingsNet, FR/AD U-Net, PWFR U-Net) or, with task = \"connection\", "
        "the stage-2 breakage connection network (U-Net on CT + breakage attention patches) on an ATM'22-layout "
        "folder and/or synthetic phantoms as set in a TOML file (see Resources/Training/). Writes last.pt/last.json "
        "(checkpoint, resumed automatically), log.csv, and best.safetensors + best.json (the best model on "
        "the validation volumes and its model card) into --out. Under torchrun it trains with DDP. "
        "Python: AirwaySegmentationLib.train_config.load_config + train.train (task=AirwayRefineLib.connect_training.ConnectionTask() "
        "for stage 2).",
    )
    train.add_argument("config", type=Path, help="training configuration (.toml)")
    train.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, log, best model)")
    train.add_argument("--init", type=Path, default=None, help="fine-tune from this model (.safetensors with its .json card)")
    train.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    train.set_defaults(
        run=_cmd_train,
        interrupted="the last finished epoch is saved in --out; run the same command again to resume",
    )
    segment = commands.add_parser(
        "segment",
        help="stage 1: three-class airway labels of one CT, a folder of CTs or a list",
        description="Segment the airway tree of chest CTs with a bundled (or given) stage-1 network: crop to the "
        "lungs, sliding-window inference (bfloat16 + channels-last on CPUs that support it, CUDA when present), "
        "largest component and hole filling. Writes labels.nii.gz (0 background, 1 trachea + main bronchi, "
        "2 lobar to segmental, 3 smaller), airway.nii.gz (binary), optionally airway_probability.nii.gz, and "
        "manifest.json, in the CT's geometry. One CT writes into --out; a folder or list writes --out/NAME/. "
        "A re-run skips finished cases. Python: AirwaySegmentationLib.segment.segment_ct / segment_files.",
    )
    segment.add_argument(
        "--in", dest="input", required=True, type=Path,
        help="CT file (.nii.gz, .nrrd, .mha), DICOM folder, folder of CTs, or list file (.txt/.csv, one path a line)",
    )
    segment.add_argument("--out", required=True, type=Path, help="output folder")
    segment.add_argument("--model", default=None, help="bundled model name or .safetensors path (default: the default model)")
    _add_engine_arguments(segment)
    defaults = InferenceSettings()
    segment.add_argument(
        "--overlap", type=float, default=defaults.overlap,
        help="minimum window overlap as a share of the training patch (default %(default)s; nnU-Net uses 0.5)",
    )
    segment.add_argument(
        "--max-window", type=int, default=defaults.max_window_zyx[0],
        help="largest window edge in voxels; windows grow from the training patch up to it so fewer cover the "
        "CT (default %(default)s; 0: training patch only)",
    )
    segment.add_argument("--blending", choices=BLENDINGS, default=defaults.blending)
    segment.add_argument("--mirror", action="store_true", help="test-time mirroring over 3 axes (8x slower)")
    segment.add_argument("--probability", action="store_true", help="also write the airway probability (float32 file)")
    segment.add_argument(
        "--all-components", action="store_true",
        help="keep every airway component (for stage 2), not only the largest",
    )
    segment.add_argument("--connectivity", type=int, choices=(6, 26), default=26, help="of the largest component")
    segment.add_argument("--shard", default=None, help="i/n: process only the i-th of n shards (e.g. SLURM array jobs)")
    segment.set_defaults(
        run=_cmd_segment,
        interrupted="finished cases are kept and skipped when the same command runs again",
    )
    refine = commands.add_parser(
        "refine",
        help="stage 2: find and connect the breaks of stage-1 labels",
        description="Compute the breakage attention of stage-1 labels (DeepTree: second-nearest component distance, "
        "sigmoid(5 - H)), predict a bridge at each break with the connection network (64^3 CT + attention "
        "patches), refuse bridges that would hang a region much wider than the airway they leave, merge the "
        "bridges and keep the largest component. Writes labels.nii.gz (refined), attention.nii.gz and "
        "breaks.json (id, LPS position, gap, components, confidence, connected, merged, rejected). "
        "Give labels with all their components (airway segment --all-components): a single component has no "
        "breaks. Python: AirwayRefineLib.refine.refine_file / refine_ct.",
    )
    refine.add_argument("--ct", required=True, type=Path, help="the CT (file or DICOM folder)")
    refine.add_argument("--labels", required=True, type=Path, help="its stage-1 labels (.nii.gz, .nrrd, .seg.nrrd)")
    refine.add_argument("--out", required=True, type=Path, help="output folder")
    refine.add_argument("--model", default=None, help="connection model name or .safetensors path (default: the bundled one)")
    refine.add_argument(
        "--connect", default="all",
        help="breaks to merge: all (every bridged break, default), none (only list them), or ids like 1,3,4",
    )
    _add_engine_arguments(refine)
    refine.set_defaults(run=_cmd_refine)

    run = commands.add_parser(
        "run",
        help="the whole job on one CT: segment, connect breaks, centerlines, report",
        description="Segment the airway tree (stage 1, all components), find and connect its breaks (stage 2), "
        "extract the centerlines of the final tree and draw a report, with one progress bar. Writes "
        "stage1_labels.nii.gz, labels.nii.gz, attention.nii.gz, breaks.json, centerlines.vtp, "
        "centerlines.mrk.json, branches.csv, branches.json, report.png, report.html and run.json into --out; "
        "a failure keeps the files of the steps before it. CPU by default, CUDA when present. "
        "Python: AirwayRefineLib.pipeline.run_pipeline.",
    )
    run.add_argument("--in", dest="input", required=True, type=Path, help="CT file (.nii.gz, .nrrd, .mha) or DICOM folder")
    run.add_argument("--out", required=True, type=Path, help="output folder")
    run.add_argument("--model", default=None, help="stage-1 model name or path (default: the bundled default)")
    run.add_argument("--connection-model", default=None, help="stage-2 model name or path (default: the bundled one)")
    run.add_argument("--connect", default="all", help="breaks to merge: all (default), none, or ids like 1,3,4")
    run.add_argument("--no-report", action="store_true", help="skip report.png / report.html")
    _add_engine_arguments(run)
    run.set_defaults(run=_cmd_run, interrupted="the files of the finished steps are kept in --out")

    demo = commands.add_parser(
        "demo",
        help="generate a phantom chest CT and run the whole job on it",
        description="Generate a synthetic chest CT (a held-out phantom, with its ground truth) into --out/phantom "
        "and run airway run on it into --out; prints where the results are. Python: AirwayRefineLib.pipeline.run_demo.",
    )
    demo.add_argument("--out", type=Path, default=Path("airway-demo"), help="output folder (default %(default)s)")
    demo.add_argument("--seed", type=int, default=None, help="phantom seed (default: the first held-out seed)")
    demo.add_argument("--shape", type=int, nargs=3, default=(160, 192, 192), metavar=("Z", "Y", "X"),
                      help="phantom grid (default %(default)s at 0.8 mm in plane)")
    _add_engine_arguments(demo)
    demo.set_defaults(run=_cmd_demo, interrupted="the files of the finished steps are kept in --out")

    report_command = commands.add_parser(
        "report",
        help="draw the visual report of an airway run folder again",
        description="Draw report.png and report.html (3-D tree by class with the breaks, coronal minimum-intensity "
        "projection with the labels, axial slices with the attention, a table of branches, components, breaks "
        "and run time) from the files airway run wrote. Python: AirwayRefineLib.pipeline.report_folder; "
        "AirwayRefineLib.report.write_report for arrays.",
    )
    report_command.add_argument("--run", dest="run_dir", required=True, type=Path, help="an airway run output folder")
    report_command.set_defaults(run=_cmd_report)

    centerline = commands.add_parser(
        "centerline",
        help="centerlines of an airway mask for planning tools",
        description="Extract the airway centerlines (rooted at the top of the trachea, spurs pruned, smoothed, "
        "radius per point, branch id, parent, generation, class, length) and write centerlines.vtp (VMTK-like "
        "polylines), centerlines.mrk.json (Slicer curves, radius per point), branches.csv and branches.json. "
        "All coordinates are LPS mm. Python: AirwayRefineLib.centerline.centerline_file / extract_centerlines.",
    )
    centerline.add_argument("--labels", required=True, type=Path, help="airway mask or three-class labels (.nii.gz, .nrrd, .seg.nrrd)")
    centerline.add_argument("--out", required=True, type=Path, help="output folder")
    centerline.set_defaults(run=_cmd_centerline)

    route = commands.add_parser(
        "route",
        help="airway path from the trachea to the branch nearest a target",
        description="Find the airway path from the top of the trachea to the centerline point nearest a target "
        "and write it as route.mrk.json and route.vtp; prints the branch sequence, length and narrowest radius. "
        "Python: AirwayRefineLib.centerline.route_file / route.",
    )
    route.add_argument("--centerlines", required=True, type=Path, help="branches.json or centerlines.vtp of airway centerline")
    route.add_argument("--target", required=True, type=float, nargs=3, metavar=("X", "Y", "Z"), help="target in LPS mm")
    route.add_argument("--out", required=True, type=Path, help="output folder")
    route.set_defaults(run=_cmd_route)
    return parser


def _engine_settings(args: argparse.Namespace) -> InferenceSettings:
    """The settings of :func:`_add_engine_arguments`'s options (the rest default)."""
    return InferenceSettings(device=args.device, precision=args.precision, batch_size=args.batch_size, threads=args.threads)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Device, precision, batch and thread options shared by the commands that run a network."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default=InferenceSettings().precision)
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help=f"windows or patches per forward pass (default: 1 on CPU, {CUDA_BATCH_SIZE} on CUDA)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``airway`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["airway", *argv])  # recorded in model cards
    try:
        return args.run(args)
    except AirwayInputError as error:
        print(f"airway {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as error:
        if error.name not in _OPTIONAL_PACKAGES:
            raise
        print(
            f"airway {args.command}: error: this command needs {error.name}, which is not installed; "
            f"install the extra with: pip install '{_DISTRIBUTION}[{_OPTIONAL_PACKAGES[error.name]}]'.",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except OSError as error:
        # A file the user named could not be read or written (permissions, full disk, ...).
        where = f" {error.filename}" if error.filename else ""
        print(f"airway {args.command}: error: cannot access{where} ({error.strerror or error}).", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Cancelled):
        kept = getattr(args, "interrupted", "no partial output was kept")
        print(f"airway {args.command}: interrupted; {kept}.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
