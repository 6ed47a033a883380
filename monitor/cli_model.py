"""The model commands of ``monitor``: predict, bench, and the model workflow (train, val, export).

Each ``cmd_*`` takes the parsed arguments and returns an exit code, which
``cli.py`` returns: ``cli.py`` is the entry point (``monitor.cli:main``), the
only module that installs signal handlers or exits and, apart from the settings
sources, the only one that reads the process environment. What touches the
process comes from there: ``load`` reads a ``--config`` file with the process's
credentials directory, and ``offline`` keeps Ultralytics off the network before
it is imported. Torch and Ultralytics are imported inside the commands that
need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from monitor.cli_bench import add_bench, cmd_bench, label_map
from monitor.model_reports import format_table, model_card_path
from monitor.settings import Settings

#: Exit codes that commands return (``cli.py``'s docstring lists them all).
EXIT_CONFIG = 2
EXIT_STARTUP = 3

#: Reads a ``--config`` file as ``cli.py`` does, or raises ConfigError.
LoadSettings = Callable[[Path], Settings]
#: Tells Ultralytics, through the process environment, never to download or install anything.
Offline = Callable[[], None]


def add_model_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, load: LoadSettings, offline: Offline
) -> None:
    """Add the predict, bench, train, val and export subcommands to ``sub``, in that order."""
    _add_predict(sub).set_defaults(func=partial(cmd_predict, load=load, offline=offline))
    add_bench(sub).set_defaults(func=partial(cmd_bench, load=load, offline=offline))
    train, val, export = _add_model_workflow(sub)
    train.set_defaults(func=partial(cmd_train, offline=offline))
    val.set_defaults(func=partial(cmd_val, offline=offline))
    export.set_defaults(func=partial(cmd_export, offline=offline))


def cmd_predict(args: argparse.Namespace, *, load: LoadSettings, offline: Offline) -> int:
    """JSON lines like /predict for images, folders and videos; annotated copies with --save.

    With ``--format megadetector``: one MegaDetector batch-output file (``--output``),
    resumable from its checkpoint, and a summary line on stderr; exit 1 when a file
    failed (the output is complete all the same). Flags of the other format exit 2.
    """
    offline()
    import json

    from pydantic import ValidationError
    from tqdm import tqdm

    from monitor import megadetector
    from monitor.detector import Detector
    from monitor.predict import annotated_name, count_inputs, iter_pictures, to_response
    from monitor.settings import ModelSettings
    from monitor.snapshots import Annotator, encode_jpeg, labels_of

    flags = {"--output": args.output, "--checkpoint": args.checkpoint, "--classifier": args.classifier}
    if args.format == "megadetector":
        misplaced = ["--save: only with --format jsonl"] if args.save is not None else []
        misplaced += ["--output: required with --format megadetector"] if args.output is None else []
    else:
        misplaced = [f"{flag}: only with --format megadetector" for flag, v in flags.items() if v is not None]
    for problem in misplaced:
        print(f"error: {problem}", file=sys.stderr)
    if misplaced:
        return EXIT_CONFIG
    base = load(args.config).model.model_dump() if args.config is not None else {"path": args.model}
    if args.label:
        base["labels"] = {**base.get("labels", {}), **dict(args.label)}
    updates = {k: v for k, v in (("imgsz", args.imgsz), ("device", args.device)) if v is not None}
    try:
        # Validated like the config file (model_copy would not): --imgsz 100 is refused, not run.
        model = ModelSettings.model_validate({**base, **updates})
    except ValidationError as exc:
        for error in exc.errors():
            print(f"error: {_flag_of(error['loc'])}: {error['msg']}", file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "megadetector":
        options = megadetector.BatchOptions(
            paths=tuple(args.paths),
            output=args.output,
            conf=args.conf,
            imgsz=model.imgsz,
            vid_stride=args.vid_stride,
            checkpoint_every=args.checkpoint,
            classifier=args.classifier,
            classifier_imgsz=args.classifier_imgsz,
        )
        summary = megadetector.predict(options, model)
        print(summary.line(), file=sys.stderr)
        return megadetector.EXIT_FAILURES if summary.failures else 0
    total = count_inputs(args.paths, vid_stride=args.vid_stride)  # bad paths fail before the model loads
    detector = Detector(model, max_batch=1)  # one picture per call
    annotator = Annotator()
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    saved: set[str] = set()
    pictures = iter_pictures(args.paths, vid_stride=args.vid_stride)
    for picture in tqdm(pictures, total=total, unit="img", disable=None, file=sys.stderr):
        (found,) = detector.detect([picture.image], conf=args.conf)
        line = {"path": str(picture.path), **to_response(found).model_dump()}
        if picture.frame is not None:
            line["frame"] = picture.frame
        print(json.dumps(line), flush=True)
        if args.save is not None:
            out = args.save / annotated_name(picture, saved)
            out.write_bytes(encode_jpeg(annotator.draw(picture.image, found, labels_of(found))))
    return 0


def _flag_of(loc: tuple[int | str, ...]) -> str:
    """The command-line flag (``--imgsz``) or else the model.* key that a ModelSettings error is about."""
    key = ".".join(map(str, loc))
    flags = {"imgsz": "--imgsz", "device": "--device", "labels": "--label", "path": "--model"}
    return flags.get(key, f"model.{key}")


def cmd_train(args: argparse.Namespace, *, offline: Offline) -> int:
    """Train a detection model (a data set YAML) or a classifier (a folder of class folders).

    The task comes from ``--task`` or else from ``--data``; the model and imgsz
    defaults are the task's. Flags that contradict each other (a classifier's
    folder with ``--task detect``, a detection model on class folders) exit 2.
    """
    offline()
    from monitor import training, training_classify  # torch loads here

    try:
        task = training_classify.infer_task(args.data, args.task)
        options = {
            "model": args.model if args.model is not None else training.DEFAULT_MODEL[task],
            "epochs": args.epochs,
            "imgsz": args.imgsz if args.imgsz is not None else training.DEFAULT_IMGSZ[task],
            "batch": args.batch,
            "device": args.device,
            "project": args.project,
            "name": args.name,
        }
        if task == "classify":
            best = training_classify.train_classifier(args.data, **options)
        else:
            best = training.train(args.data, **options)
    except training.TaskMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(best)
    print(model_card_path(best))
    return 0


def cmd_val(args: argparse.Namespace, *, offline: Offline) -> int:
    """Detection: the per-class P, R, mAP table; classification: top-1 and top-5 accuracy per class."""
    offline()
    from monitor import training, training_classify  # torch loads here

    try:
        task = training_classify.infer_task(args.data, args.task)
        imgsz = args.imgsz if args.imgsz is not None else training.DEFAULT_IMGSZ[task]
        if task == "classify":
            from monitor.model_reports import format_classify_table

            found = training_classify.validate_classifier(
                args.data, args.model, imgsz, batch=args.batch, device=args.device
            )
            print(found.to_json() if args.json else format_classify_table(found))
            return 0
        report = training.validate(args.data, args.model, imgsz=imgsz, batch=args.batch, device=args.device)
    except training.TaskMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(report.to_json() if args.json else format_table(report))
    return 0


def cmd_export(args: argparse.Namespace, *, offline: Offline) -> int:
    """Export detection or classification weights; the default imgsz is the model's task's."""
    offline()
    from monitor import training  # torch loads here

    try:
        out = training.export(
            args.model, args.format, imgsz=args.imgsz, dynamic=args.dynamic, half=args.half, batch=args.batch
        )
    except training.TaskMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(out)
    return 0


def _add_predict(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    predict = sub.add_parser(
        "predict",
        help="detect objects in images, folders and videos: JSON lines like /predict, or MegaDetector files",
        description="Detect objects in pictures and print one JSON line per picture (or video frame) "
        'in the /predict format, plus "path" (and "frame" for videos); or, with --format megadetector, '
        "write one MegaDetector batch-output file for Timelapse and AddaxAI. Nothing is downloaded.",
    )
    predict.add_argument("paths", type=Path, nargs="+", help="images, folders (searched recursively), videos")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", "-c", type=Path, help="take model.* (path, imgsz, labels...) from this file"
    )
    source.add_argument("--model", type=Path, help="weights (.pt or an export)")
    predict.add_argument("--label", type=label_map, action="append", help="rename a class: Normal=person")
    predict.add_argument("--imgsz", type=int, help="inference size (default: the config's, else 640)")
    predict.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    predict.add_argument(
        "--conf",
        type=float,
        default=0.25,
        help="lowest confidence kept (default: %(default)s); MegaDetector's own runs keep boxes "
        "down to 0.005 and let Timelapse or AddaxAI choose the threshold: pass --conf 0.005 for that",
    )
    predict.add_argument("--vid-stride", type=int, default=1, help="every Nth video frame (default: 1)")
    predict.add_argument("--save", type=Path, help="write annotated JPEG copies into this folder (jsonl)")
    predict.add_argument(
        "--format",
        choices=("jsonl", "megadetector"),
        default="jsonl",
        help="jsonl: JSON lines on stdout (default); megadetector: one MegaDetector batch-output "
        "file (format 1.6, for Timelapse and AddaxAI) written to --output",
    )
    predict.add_argument("--output", type=Path, help="megadetector: the results file, e.g. results.json")
    predict.add_argument(
        "--checkpoint",
        type=int,
        metavar="N",
        help="megadetector: rewrite OUTPUT.checkpoint.json every N files; a rerun with the same "
        "--output resumes from it, and it is deleted once OUTPUT is complete",
    )
    predict.add_argument(
        "--classifier", type=Path, help="megadetector: classify each box's crop with these weights"
    )
    predict.add_argument(
        "--classifier-imgsz", type=int, default=224, help="the classifier's input size (default: %(default)s)"
    )
    return predict


def _add_model_workflow(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The train, val and export subcommands (Ultralytics, offline: nothing is downloaded)."""
    no_download = (
        "Nothing is downloaded: pretrained .pt weights must be a local path. "
        "Set YOLO_VERBOSE=True to see Ultralytics' progress."
    )
    # training_classify.CLASSIFY_LAYOUT, spelt out: importing it here would load torch for --help.
    layout = "DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg (optionally DATA/test/<class>/)"
    task_help = (
        "detect (--data is a data set YAML) or classify (--data is a folder of class folders); "
        "default: inferred from --data, and a contradiction is refused"
    )
    data_help = f"detect: Ultralytics data set YAML; classify: a folder laid out as {layout}"
    train = sub.add_parser(
        "train",
        help="train a detection model or a species classifier; prints best.pt and its model_card.json",
        description="Train a YOLO detection model (--data a YAML) or fine-tune a classification model "
        f"(--task classify, --data a folder laid out as {layout}; a folder of class folders without "
        "train/ and val/ is refused: split it by time or camera yourself), write model_card.json "
        "(mAP for detect, top-1/top-5 accuracy for classify) next to best.pt, and print both paths. "
        "Defaults for detect: yolov8s.pt, imgsz 416; for classify: yolov8n-cls.pt (or "
        "yolov8n-cls.yaml for random initial weights), imgsz 224, the daemon's classifier.imgsz; "
        f"both: 10 epochs, batch 16. {no_download}",
    )
    train.add_argument("--data", type=Path, required=True, help=data_help)
    train.add_argument("--task", choices=["detect", "classify"], help=task_help)
    train.add_argument(
        "--model",
        help="local pretrained .pt weights to fine-tune (no download), or an architecture "
        "such as yolov8s.yaml or yolov8n-cls.yaml for random initial weights "
        "(default: yolov8s.pt; yolov8n-cls.pt for classify)",
    )
    train.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    _add_run_options(train)
    train.add_argument(
        "--project", type=Path, default=Path("runs/train"), help="runs directory (default: %(default)s)"
    )
    train.add_argument("--name", default="exp", help="run name, numbered when taken (default: %(default)s)")

    val = sub.add_parser(
        "val",
        help="validate a model; prints the per-class table (mAP, or top-1/top-5 accuracy)",
        description="Validate weights on a data set's val split and print Ultralytics' per-class table: "
        "precision, recall and mAP for a detection model, top-1 and top-5 accuracy for a "
        f"classifier (--task classify, --data a folder laid out as {layout}). " + no_download,
    )
    val.add_argument("--data", type=Path, required=True, help=data_help)
    val.add_argument("--task", choices=["detect", "classify"], help=task_help)
    val.add_argument("--model", type=Path, required=True, help="local weights (.pt or an export)")
    _add_run_options(val)
    val.add_argument("--json", action="store_true", help="print JSON instead of the table")

    export = sub.add_parser(
        "export",
        help="export a model (detector or classifier) for the daemon; prints the exported path",
        description="Export .pt weights of a detection or a classification model next to themselves "
        f"and print the exported path. {no_download}",
    )
    export.add_argument("--model", type=Path, required=True, help="local .pt weights")
    export.add_argument("--format", required=True, choices=["onnx", "openvino", "engine"])
    export.add_argument(
        "--imgsz", type=int, help="multiple of 32 (default: 416 for a detector, 224 for a classifier)"
    )
    export.add_argument(
        "--batch",
        type=int,
        default=16,
        help="largest batch of a dynamic TensorRT engine, the daemon's detect.max_batch "
        "(classifier.max_batch for a classifier) (default: %(default)s)",
    )
    export.add_argument(
        "--no-dynamic",
        dest="dynamic",
        action="store_false",
        help="fixed batch and size (the daemon's model.imgsz must then equal --imgsz)",
    )
    export.add_argument("--half", action="store_true", help="fp16 weights (onnx and engine need CUDA)")
    return train, val, export


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--imgsz``, ``--batch`` and ``--device``, as train and val take them (imgsz: None, the task's)."""
    parser.add_argument("--imgsz", type=int, help="multiple of 32 (default: 416; 224 for classify)")
    parser.add_argument("--batch", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
