"""The ``gradprobe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.inputs import EXPECTED, InvalidInput, load_images

if TYPE_CHECKING:
    from service.classifier import LoadedClassifier

DESCRIPTION = """\
GradProbe tells when an image classifier's input is novel (out-of-distribution, corrupted or
adversarial), from the gradients of all contrast labels backpropagated through the classifier.

The default deployment is a Fashion-MNIST CNN, built reproducibly on first use and cached under
$GRADPROBE_HOME (default ~/.cache/gradprobe). Images are float32 (B, 1, 28, 28) in [0, 1] or
uint8 (B, 28, 28), saved with numpy.save.
"""

EPILOG = """\
examples:
  gradprobe info --json
  gradprobe features --images batch.npy --output features.npy
  gradprobe demo
  gradprobe serve --port 50051 --metrics-port 9464
  gradprobe archive --mode gate --export-path model-store
"""


class UsageError(Exception):
    """A mistake in how the command was called; reported in one line, exit status 2."""


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return name


def _load(args: argparse.Namespace) -> LoadedClassifier:
    from service.artifacts import ensure_default_model
    from service.classifier import load_classifier

    model_dir = args.model_dir or ensure_default_model(quiet=args.quiet)
    return load_classifier(model_dir, device=_device(args.device))


def cmd_info(args: argparse.Namespace) -> int:
    loaded = _load(args)
    manifest = loaded.manifest
    info = {
        "classifier": str(loaded.path),
        "format": manifest.format,
        "sha256": manifest.sha256,
        "architecture": manifest.architecture,
        "input_shape": manifest.input_shape,
        "input_dtype": manifest.input_dtype,
        "classes": manifest.classes,
        "layers": manifest.layers,
        "test_accuracy": manifest.test_accuracy,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from detectors.gradients import GradientFeatures

    images = load_images(args.images)
    loaded = _load(args)
    engine = GradientFeatures(loaded.module, labels=args.labels, max_batch=args.batch_size)
    if engine.layer_names != loaded.manifest.layers:
        raise UsageError("the model's layers differ from its manifest; rebuild the artifact")
    import torch

    chunks = []
    steps = range(0, len(images), args.batch_size)
    for start in tqdm(
        steps,
        desc="gradient features",
        unit="batch",
        disable=args.quiet or len(steps) < 2,
        file=sys.stderr,
    ):
        batch = torch.from_numpy(images[start : start + args.batch_size])
        chunks.append(engine.compute(batch).cpu().numpy())
    features = np.concatenate(chunks).astype(np.float32)
    np.save(args.output, features)
    if not args.quiet:
        print(
            f"wrote {args.output}: {features.dtype} {features.shape} "
            f"(images, labels, layers = {', '.join(engine.layer_names)})",
            file=sys.stderr,
        )
    return 0


def cmd_train_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from service.artifacts import build_default_model, ensure_default_model
    from service.classifier import TrainingRecipe

    recipe = TrainingRecipe()
    custom = replace(
        recipe,
        seed=args.seed if args.seed is not None else recipe.seed,
        epochs=args.epochs if args.epochs is not None else recipe.epochs,
    )
    if args.output_dir is not None:
        if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.force:
            raise UsageError(f"{args.output_dir} is not empty; pass --force to replace it")
        path = build_default_model(args.output_dir, custom, quiet=args.quiet)
    elif custom != recipe:
        raise UsageError("--seed/--epochs build a custom model: give it an --output-dir")
    else:
        path = ensure_default_model(force=args.force, quiet=args.quiet)
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(_load(args), per_set=args.per_set, plot=args.plot, quiet=args.quiet)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import load_default_assessor, serve
    from service.settings import Settings, SettingsError

    try:
        settings = Settings.from_sources(args)
        settings.resolved_device()
    except SettingsError as exc:
        raise UsageError(str(exc)) from exc
    return serve(settings, lambda: load_default_assessor(settings))


def cmd_assess(args: argparse.Namespace) -> int:
    images = load_images(args.images)
    rows = _assess_remote(args, images) if args.server else _assess_local(args, images)
    if rows is None:
        return 1
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        if not args.quiet:
            print(f"wrote {args.output}: {len(rows)} verdicts", file=sys.stderr)
    return 0


def _assess_local(args: argparse.Namespace, images: np.ndarray) -> list[dict]:
    """In this process: the classifier and its default detector H (trained if absent)."""
    from service.artifacts import load_default_detector
    from service.assessor import Assessor

    loaded = _load(args)
    detector = load_default_detector(loaded, quiet=args.quiet)
    assessor = Assessor(loaded, detector, device=_device(args.device))
    rows = []
    for start in range(0, len(images), args.batch_size):
        batch = assessor.assess(images[start : start + args.batch_size])
        for offset, a in enumerate(batch.assessments):
            rows.append(
                {
                    "index": start + offset,
                    "prediction": a.prediction,
                    "class_name": assessor.classes[a.prediction],
                    "verdict": a.verdict,
                    "scores": a.scores,
                }
            )
    return rows


def _assess_remote(args: argparse.Namespace, images: np.ndarray) -> list[dict] | None:
    """Through a running `gradprobe serve`; None after printing the server's error."""
    import grpc

    from service.client import ReliabilityClient

    rows = []
    with ReliabilityClient(args.server, timeout=args.timeout, wait_for_ready=False) as client:
        for start in range(0, len(images), args.batch_size):
            try:
                answers = client.assess(images[start : start + args.batch_size])
            except grpc.RpcError as exc:
                code = exc.code()
                hint = f" (is `gradprobe serve` running at {args.server}?)"
                print(
                    f"gradprobe assess: error: the server answered {code.name}: {exc.details()}"
                    + (hint if code == grpc.StatusCode.UNAVAILABLE else ""),
                    file=sys.stderr,
                )
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidInput(exc.details()) from None
                return None
            for answer in answers:
                keys = ("prediction", "class_name", "verdict", "scores")
                rows.append({"index": start + answer["index"], **{k: answer[k] for k in keys}})
    return rows


def _add_service_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from service.settings import add_arguments

    serve = sub.add_parser(
        "serve",
        help="run the gRPC reliability service",
        description="Serve the default classifier and detector H over gRPC "
        "(gradprobe.v1.Reliability, health, reflection) with Prometheus metrics on "
        "--metrics-port. Every flag can also be set as GRADPROBE_<FLAG> (e.g. "
        "GRADPROBE_MAX_BATCH_SIZE=16); a flag wins over the environment. SIGTERM drains.",
    )
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    assess = sub.add_parser(
        "assess",
        parents=[common],
        help="verdicts for a batch of images; one JSON line per image",
        description="Assess a .npy batch and print one JSON object per image: index, "
        "prediction, class_name, verdict, scores (in_distribution, ood, corrupted, "
        "adversarial). In this process by default (the detector H is trained on first use); "
        "with --server, through a running `gradprobe serve`.",
    )
    assess.add_argument(
        "--server", default=None, help="HOST:PORT of a running server (default: assess locally)"
    )
    assess.add_argument("--images", type=Path, required=True, help=f".npy file: {EXPECTED}")
    assess.add_argument(
        "--output", type=Path, default=None, help=".jsonl file to write (default: stdout)"
    )
    assess.add_argument(
        "--batch-size", type=int, default=64, help="images per request (default 64)"
    )
    assess.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request (default 60)"
    )
    assess.set_defaults(func=cmd_assess)


def cmd_train_detector(args: argparse.Namespace) -> int:
    from service.artifacts import ensure_default_detector

    loaded = _load(args)
    print(ensure_default_detector(loaded, force=args.force, quiet=args.quiet))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detectors.report import write_report
    from detectors.training import prepare
    from service.artifacts import load_default_detector

    loaded = _load(args)
    detector = load_default_detector(loaded, quiet=args.quiet)
    data = prepare(loaded.module, loaded.manifest.sha256, progress=not args.quiet)
    path = write_report(
        data,
        loaded.module,
        detector,
        args.output_dir,
        progress=not args.quiet,
        leave_out=not args.no_leave_one_out,
    )
    print(path)
    return 0


def _add_detector_commands(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    train = sub.add_parser(
        "train-detector",
        parents=[common],
        help="(re)build the detector H for the classifier",
        description="Build the challenge data (OOD sets, corruptions at 5 levels, adversarial "
        "attacks; cached), compute gradient signals, fit H (scikit-learn MLP + temperature "
        "scaling), export it to ONNX with a manifest naming the classifier's sha256.",
    )
    train.add_argument("--force", action="store_true", help="retrain even if it exists")
    train.set_defaults(func=cmd_train_detector)
    evaluate = sub.add_parser(
        "evaluate",
        parents=[common],
        help="held-out report: H vs the peers, seen vs unseen",
        description="Write REPORT.md and PNG plots: AUROC / FPR@95 / detection accuracy per "
        "OOD set, corruption and attack for H and the peers (MSP, ODIN, Energy, Mahalanobis, "
        "KNN, ViM, GradNorm), the 4-way confusion matrix, leave-one-kind-out results and an "
        "ablation of H's signals.",
    )
    evaluate.add_argument(
        "--output-dir",
        type=Path,
        default=Path("benchmarks/detector"),
        help="where REPORT.md and the plots go (default benchmarks/detector)",
    )
    evaluate.add_argument(
        "--no-leave-one-out",
        action="store_true",
        help="skip the (slow) leave-one-kind-out retraining",
    )
    evaluate.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradprobe",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="classifier folder (classifier.pt2 + manifest.json); "
        "default: the built-in Fashion-MNIST model, built if absent",
    )
    common.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where gradients are computed (default: cuda when present)",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or notes on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        parents=[common],
        help="describe the classifier in use",
        description="Describe the classifier: artifact, input, classes and "
        "the layers whose gradient norms form the feature columns.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    feats = sub.add_parser(
        "features",
        parents=[common],
        help="per-layer gradient norms of every contrast label",
        description="Compute F[b, c, l] = ||dCE(f(x_b), onehot(c)) / dθ_l||² for every image "
        "b, class c and parameterized layer l (layers in the order of `info`).",
    )
    feats.add_argument("--images", type=Path, required=True, help=f".npy file: {EXPECTED}")
    feats.add_argument(
        "--output",
        type=Path,
        required=True,
        help=".npy file to write: float32 (B, N, L), or (B, 1, L) for --labels confounding",
    )
    feats.add_argument(
        "--labels",
        choices=("onehot", "confounding"),
        default="onehot",
        help="onehot: all N contrast labels (default); confounding: one all-ones label",
    )
    feats.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per gradient pass (memory ~ batch × classes)",
    )
    feats.set_defaults(func=cmd_features)

    train = sub.add_parser(
        "train-model",
        parents=[common],
        help="(re)build the default classifier",
        description="Train the default Fashion-MNIST CNN reproducibly (fixed seed) from the "
        "Debian package dataset-fashion-mnist and export it with its manifest.",
    )
    train.add_argument("--force", action="store_true", help="rebuild even if it exists")
    train.add_argument(
        "--output-dir", type=Path, default=None, help="build into this folder instead of the cache"
    )
    train.add_argument("--seed", type=int, default=None, help="custom seed (needs --output-dir)")
    train.add_argument(
        "--epochs", type=int, default=None, help="custom epoch count (needs --output-dir)"
    )
    train.set_defaults(func=cmd_train_model)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="show what the gradients see on clean and novel images",
        description="Build the default model if absent, then compute gradient features for "
        "clean Fashion-MNIST test images and for out-of-distribution, corrupted and "
        "adversarial images, and print how far each set sits from the clean one.",
    )
    demo.add_argument("--per-set", type=int, default=200, help="images per set (default 200)")
    demo.add_argument(
        "--plot", type=Path, default=None, help="also save a PNG of the feature distributions here"
    )
    demo.set_defaults(func=cmd_demo)
    _add_service_commands(sub, common)
    _add_detector_commands(sub, common)
    _add_archive_command(sub, common)
    return parser


def cmd_archive(args: argparse.Namespace) -> int:
    from service.artifacts import ensure_default_model
    from service.torchserve_archive import ArchiveOptions, build_archive

    model_dir = args.model_dir or ensure_default_model(quiet=args.quiet)
    options = ArchiveOptions(
        mode=args.mode,
        target=args.target,
        timeout_ms=args.timeout_ms,
        on_unreliable=args.on_unreliable,
        on_unavailable=args.on_unavailable,
        batch_size=args.ts_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        workers=args.workers,
    )
    try:
        path = build_archive(
            model_dir, args.export_path, name=args.name, options=options, force=args.force
        )
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    print(path)
    return 0


def _add_archive_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    archive = sub.add_parser(
        "archive",
        parents=[common],
        help="pack the classifier and the GradProbe handler for TorchServe (.mar)",
        description=textwrap.fill(
            "Write a TorchServe model archive: the exported classifier, its manifest, "
            "the GradProbe handler (deploy/torchserve/) and the gRPC stubs. TorchServe serves "
            "predictions as usual and asks the GradProbe sidecar for a verdict per batch. The "
            "--mode/--target/--timeout-ms/--on-* values go to the archive's model-config.yaml; "
            "at run time GRADPROBE_TS_MODE, GRADPROBE_TS_TARGET, GRADPROBE_TS_TIMEOUT_MS, "
            "GRADPROBE_TS_ON_UNRELIABLE and GRADPROBE_TS_ON_UNAVAILABLE override them.",
            width=88,
        ),
        epilog="example:\n  gradprobe archive --mode gate --on-unreliable refuse "
        "--export-path model-store\n  torchserve --start --model-store model-store "
        "--models fashion=fashion.mar --disable-token-auth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    archive.add_argument(
        "--export-path", type=Path, default=Path("model-store"), help="folder (default model-store)"
    )
    archive.add_argument("--name", default="fashion", help="model name (default fashion)")
    archive.add_argument(
        "--mode",
        choices=("monitor", "gate"),
        default="monitor",
        help="monitor: answer at once, verdicts to metrics and logs; gate: the response "
        "carries the verdict (default monitor)",
    )
    archive.add_argument(
        "--target", default="127.0.0.1:50051", help="GradProbe's HOST:PORT (default: the sidecar)"
    )
    archive.add_argument(
        "--timeout-ms",
        type=float,
        default=250.0,
        help="longest wait for a verdict; past it the answer says 'unavailable' (default 250)",
    )
    archive.add_argument(
        "--on-unreliable",
        choices=("flag", "refuse"),
        default="flag",
        help='gate: flag ("reliable": false) or refuse (HTTP 422) inputs not judged '
        "in_distribution (default flag)",
    )
    archive.add_argument(
        "--on-unavailable",
        choices=("mark", "refuse"),
        default="mark",
        help="gate: when GradProbe is down or late, answer with a marker or refuse (503) "
        "(default mark)",
    )
    archive.add_argument(
        "--ts-batch-size", type=int, default=8, help="TorchServe batch size (default 8)"
    )
    archive.add_argument(
        "--max-batch-delay-ms", type=int, default=5, help="TorchServe batch delay (default 5)"
    )
    archive.add_argument("--workers", type=int, default=1, help="TorchServe workers (default 1)")
    archive.add_argument("--force", action="store_true", help="replace an existing archive")
    archive.set_defaults(func=cmd_archive)


def main(argv: Sequence[str] | None = None) -> int:
    from detectors.datasets import DatasetMissing
    from service.classifier import ArtifactError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    try:
        return args.func(args)
    except (InvalidInput, UsageError, ArtifactError, DatasetMissing) as exc:
        print(f"gradprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
