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

from service.inputs import GENERIC_EXPECTED, InvalidInput, load_images

if TYPE_CHECKING:
    from detectors.model_dir import LoadedClassifier
    from service.client import ReliabilityClient

DESCRIPTION = """\
GradProbe tells when an image classifier's input is novel (out-of-distribution, corrupted or
adversarial), from the gradients of all contrast labels backpropagated through the classifier.

Bring your own classifier: `gradprobe fit` turns a TorchScript (.pt) or torch.export (.pt2) file
and a folder of your clean images into a model dir (classifier, manifest, detector H, report)
that every other command takes with --model-dir. Without --model-dir, commands use the built-in
example, a Fashion-MNIST CNN and its detector made by `train-model` and `fit` on first use
(`serve` never builds: it names the command to run) and cached under $GRADPROBE_HOME (default
~/.cache/gradprobe). Images are .npy batches: float32 (B, C, H, W) in [0, 1] at the
model's input shape (`gradprobe info`), or uint8 pixels.
"""

EPILOG = """\
examples:
  gradprobe fit --classifier model.pt --train-data train/ --output my-model
  gradprobe info --model-dir my-model --json
  gradprobe assess --model-dir my-model --images batch.npy --output verdicts.jsonl
  gradprobe serve --model-dir my-model --port 50051 --metrics-port 9464
  gradprobe example signs --output signs && gradprobe fit --classifier signs/classifier.pt \\
      --train-data signs/train --output signs/model
  gradprobe demo
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


def _load(args: argparse.Namespace, *, with_detector: bool = True) -> LoadedClassifier:
    """The model dir's classifier; without --model-dir the built-in example's, built first
    (its detector too when ``with_detector``)."""
    from detectors.model_dir import load_classifier
    from service.artifacts import default_classifier_only, ensure_default_model

    model_dir = args.model_dir
    if model_dir is None:
        build = ensure_default_model if with_detector else default_classifier_only
        model_dir = build(quiet=args.quiet)
    return load_classifier(model_dir, device=_device(args.device))


def cmd_info(args: argparse.Namespace) -> int:
    from detectors.detector import MANIFEST_FILE as DETECTOR_MANIFEST
    from detectors.model_dir import DETECTOR_DIR, REPORT_DIR

    loaded = _load(args, with_detector=False)
    manifest = loaded.manifest
    detector = loaded.model_dir / DETECTOR_DIR
    report = loaded.model_dir / REPORT_DIR / "REPORT.md"
    info = {
        "model_dir": str(loaded.model_dir),
        "classifier": str(loaded.path),
        "format": manifest.format,
        "sha256": manifest.sha256,
        "architecture": manifest.architecture,
        "input_shape": manifest.input_shape,
        "input_dtype": manifest.input_dtype,
        "input_range": manifest.input_range,
        "normalization": manifest.normalization,
        "resizes_encoded": manifest.resize,
        "classes": manifest.classes,
        "layers": manifest.layers,
        "test_accuracy": manifest.test_accuracy,
        "detector": str(detector) if (detector / DETECTOR_MANIFEST).exists() else None,
        "report": str(report) if report.exists() else None,
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

    loaded = _load(args, with_detector=False)
    images = load_images(args.images, loaded.spec)
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

    from service.artifacts import (
        build_default_classifier,
        default_fit_command,
        ensure_default_classifier,
    )
    from service.classifier import TrainingRecipe

    recipe = TrainingRecipe()
    custom = replace(
        recipe,
        seed=args.seed if args.seed is not None else recipe.seed,
        epochs=args.epochs if args.epochs is not None else recipe.epochs,
    )
    if args.fit and args.output_dir is not None:
        raise UsageError("--fit builds the default model dir: drop --output-dir, or run fit")
    if args.output_dir is not None:
        if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.force:
            raise UsageError(f"{args.output_dir} is not empty; pass --force to replace it")
        path = build_default_classifier(args.output_dir, custom, quiet=args.quiet)
    elif custom != recipe:
        raise UsageError("--seed/--epochs build a custom model: give it an --output-dir")
    else:
        path = ensure_default_classifier(force=args.force, quiet=args.quiet)
    if args.fit:
        from service.artifacts import ensure_default_model

        print(ensure_default_model(force=args.force, quiet=args.quiet))
        return 0
    if not args.quiet:
        output = path.with_name(path.name + "-fitted") if args.output_dir else None
        print(f"next, its detector H: {default_fit_command(path, output)}", file=sys.stderr)
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(_load(args), per_set=args.per_set, plot=args.plot, quiet=args.quiet)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.security import load_security
    from service.server import PortUnavailable, load_assessors, serve
    from service.settings import Settings, SettingsError

    try:
        settings = Settings.from_sources(args)
        settings.resolved_device()
        # The server reads them again when it starts; checked here too so that a bad
        # certificate or token file fails in a second, before the models load.
        load_security(settings)
    except SettingsError as exc:
        raise UsageError(str(exc)) from exc
    # Loaded before the server starts listening: a model dir that is not servable fails
    # fast with its reason, before any port is taken.
    assessors = load_assessors(settings)
    try:
        return serve(settings, assessors)
    except PortUnavailable as exc:  # a setting to change, not a crash: one line, exit 2
        raise UsageError(str(exc)) from None


def cmd_assess(args: argparse.Namespace) -> int:
    rows = _assess_remote(args) if args.server else _assess_local(args)
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


def _assess_local(args: argparse.Namespace) -> list[dict]:
    """In this process: the model dir's classifier and H (the built-in example's H is
    trained on first use)."""
    from service.assessor import Assessor
    from service.registry import load_detector

    loaded = _load(args)
    images = load_images(args.images, loaded.spec)
    detector = load_detector(loaded)
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


def _assess_remote(args: argparse.Namespace) -> list[dict] | None:
    """Through a running `gradprobe serve`; None after printing the server's error."""
    import grpc

    from detectors.spec import ModelSpec

    rows = []
    with _remote_client(args) as client:
        try:
            info = client.info(model=args.model)
        except grpc.RpcError as exc:
            # UNAVAILABLE is also what a failed TLS handshake looks like to a client.
            hint = (
                " (is `gradprobe serve` running there, and do --tls/--tls-ca/--tls-cert match "
                "its TLS settings?)"
                if exc.code() == grpc.StatusCode.UNAVAILABLE
                else ""
            )
            print(
                f"gradprobe assess: error: {args.server} answered {exc.code().name}: "
                f"{exc.details()}{hint}",
                file=sys.stderr,
            )
            return None
        spec = ModelSpec(tuple(info["input_shape"]), tuple(info["classes"]))
        images = load_images(args.images, spec)
        for start in range(0, len(images), args.batch_size):
            try:
                answers = client.assess(images[start : start + args.batch_size], model=args.model)
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


def _remote_client(args: argparse.Namespace) -> ReliabilityClient:
    """A client of ``args.server`` with the command's TLS and token options."""
    import os

    from service.client import ReliabilityClient, read_token_file

    try:
        if args.token_file is not None:
            token = read_token_file(args.token_file)
        else:
            token = os.environ.get("GRADPROBE_TOKEN") or None
        return ReliabilityClient(
            args.server,
            timeout=args.timeout,
            wait_for_ready=False,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token=token,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """How a command reaches a server with TLS, mutual TLS or bearer tokens."""
    add = parser.add_argument
    add("--tls", action="store_true", help="with --server: TLS, checked against system roots")
    add("--tls-ca", type=Path, default=None, help="with --server: TLS, checked against this CA")
    add("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    add("--tls-key", type=Path, default=None, help="the key of --tls-cert")
    add(
        "--tls-server-name",
        default=None,
        help="name to check the server certificate for, when --server's host is not in it",
    )
    add(
        "--token-file",
        type=Path,
        default=None,
        help="file whose first line is a bearer token (default: $GRADPROBE_TOKEN, if set)",
    )


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
    assess.add_argument(
        "--model", default="", help="with --server: the served model's name (see ListModels)"
    )
    assess.add_argument("--images", type=Path, required=True, help=f".npy file: {GENERIC_EXPECTED}")
    assess.add_argument(
        "--output", type=Path, default=None, help=".jsonl file to write (default: stdout)"
    )
    assess.add_argument(
        "--batch-size", type=int, default=64, help="images per request (default 64)"
    )
    assess.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request (default 60)"
    )
    add_client_arguments(assess)
    assess.set_defaults(func=cmd_assess)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import shutil

    from detectors.model_dir import REPORT_DIR
    from service.artifacts import ensure_default_model

    model_dir = args.model_dir
    if model_dir is None:
        model_dir = ensure_default_model(quiet=args.quiet)
    report = model_dir / REPORT_DIR
    if not (report / "REPORT.md").exists():
        raise UsageError(
            f"{model_dir} has no report: it is written by `gradprobe fit` (without "
            "--no-report); run fit again to make one"
        )
    if args.output_dir is None or args.output_dir.resolve() == report.resolve():
        print(report / "REPORT.md")
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(report.iterdir()):
        shutil.copy2(file, args.output_dir / file.name)
    print(args.output_dir / "REPORT.md")
    return 0


def _add_detector_commands(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        parents=[common],
        help="held-out report: H vs the peers, seen vs unseen",
        description=textwrap.fill(
            "Show the held-out report `gradprobe fit` wrote into the model dir (the built-in "
            "example's without --model-dir): REPORT.md and PNG plots with AUROC / FPR@95 / "
            "detection accuracy per OOD set, corruption and attack for H and the peers (MSP, "
            "ODIN, Energy, Mahalanobis, KNN, ViM, GradNorm), the 4-way confusion matrix, "
            "leave-one-kind-out results and an ablation of H's signals. Prints its path, or "
            "copies it into --output-dir (`--output-dir benchmarks/detector` regenerates the "
            "shipped report)."
        ),
    )
    evaluate.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="copy REPORT.md and the plots here (default: print where they are)",
    )
    evaluate.set_defaults(func=cmd_evaluate)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    return values


def _shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}")
    return values  # type: ignore[return-value]


def cmd_fit(args: argparse.Namespace) -> int:
    from detectors.fit.domain import FitRecipe
    from detectors.fit.training import FitOptions, fit

    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together")
    if args.output.exists() and any(args.output.iterdir()) and not args.force:
        from detectors.spec import MANIFEST_FILE

        if not (args.output / MANIFEST_FILE).exists():
            raise UsageError(
                f"{args.output} exists and is not a model dir; choose another --output"
            )
    if args.time_limit < 0:
        raise UsageError("--time-limit is in minutes, 0 or more (0: no limit)")
    recipe = FitRecipe.quick(args.seed) if args.quick else FitRecipe(seed=args.seed)
    if args.budget != 1.0:
        recipe = recipe.scaled(args.budget)
    options = FitOptions(
        val_data=args.val_data,
        ood_data=list(args.ood_data or []),
        target_fpr=args.target_fpr,
        mean=args.mean,
        std=args.std,
        input_shape=args.input_shape,
        recipe=recipe,
        time_limit_s=args.time_limit * 60 if args.time_limit > 0 else None,
        report=not args.no_report,
        leave_one_out=not args.no_leave_one_out,
        resize=args.resize_encoded,
        progress=not args.quiet,
    )
    print(fit(args.classifier, args.train_data, args.output, options))
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from detectors.fit.signs import build_example

    print(
        build_example(
            args.output, per_class=args.per_class, size=args.size, seed=args.seed,
            progress=not args.quiet,
        )
    )  # fmt: skip
    return 0


def _add_fit_commands(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser(
        "fit",
        help="bring your own classifier: build a model dir (detector H, report) for it",
        description=textwrap.fill(
            "Build a model dir for your classifier from your own clean images: the classifier "
            "file with a manifest (hash, input shape, classes, layers), challenge data made for "
            "your domain (out-of-distribution sets, corruptions scaled to the image size, "
            "attacks on your classifier with budgets scaled to it, your own --ood-data), the "
            "KNN/Mahalanobis banks fitted on your images, the detector H (calibrated, with an "
            "operating point for --target-fpr), and a held-out report with peers and "
            "leave-one-kind-out results. Expensive steps are cached: an interrupted fit "
            "resumes.",
            width=88,
        ),
        epilog="The classifier takes float32 (B, C, H, W) in [0, 1] and returns logits (B, N); "
        "it normalizes inside (the default) or GradProbe applies --mean/--std first.\n\n"
        "example:\n  gradprobe fit --classifier signs.pt --train-data signs/train "
        "--output signs-model\n  gradprobe serve --model-dir signs-model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument(
        "--classifier",
        type=Path,
        required=True,
        help="TorchScript (.pt, torch.jit.save) or torch.export (.pt2) file",
    )
    fit.add_argument(
        "--train-data",
        type=Path,
        required=True,
        help="ImageFolder tree (one sub-folder per class, PNG/JPEG; sorted names = class "
        "indices) or .npz with `images` and `labels`",
    )
    fit.add_argument("--output", type=Path, required=True, help="the model dir to write")
    fit.add_argument(
        "--val-data",
        type=Path,
        default=None,
        help="held-out clean images, same layout (default: a share of --train-data)",
    )
    fit.add_argument(
        "--ood-data",
        type=Path,
        action="append",
        help="a folder (or .npz) of your own examples of what should be flagged; repeatable",
    )
    fit.add_argument(
        "--target-fpr",
        type=float,
        default=0.02,
        help="share of clean validation images the operating point may flag (default 0.02; "
        "new clean images are flagged a little more often, as the threshold is estimated "
        "from a few hundred)",
    )
    fit.add_argument(
        "--mean", type=_floats, default=None, help="per-channel mean GradProbe subtracts first"
    )
    fit.add_argument("--std", type=_floats, default=None, help="per-channel std, with --mean")
    fit.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="C,H,W the classifier takes (default: the training images' channels and size)",
    )
    fit.add_argument(
        "--resize-encoded",
        action="store_true",
        help="let the server resize PNG/JPEG requests of another size (default: refuse them)",
    )
    fit.add_argument(
        "--quick", action="store_true", help="few challenge images: to try the commands out"
    )
    fit.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="scale every challenge-image count by this factor (default 1)",
    )
    fit.add_argument(
        "--time-limit",
        type=float,
        default=45.0,
        metavar="MINUTES",
        help="measure the classifier's cost per image first and scale the challenge-image "
        "counts down when building them would take longer than this (default 45; 0: never)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the challenge data (default 0)")
    fit.add_argument("--no-report", action="store_true", help="skip the held-out report")
    fit.add_argument(
        "--no-leave-one-out",
        action="store_true",
        help="report without the (slower) leave-one-kind-out retraining",
    )
    fit.add_argument("--force", action="store_true", help="replace --output if it exists")
    fit.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or notes on stderr"
    )
    fit.set_defaults(func=cmd_fit)

    example = sub.add_parser(
        "example",
        help="make the RGB example: traffic-sign images and a classifier (TorchScript)",
        description="Generate a synthetic traffic-sign data set (ImageFolder PNGs, RGB), train "
        "a small ResNet-style classifier on it and save it as TorchScript: the input of "
        "`gradprobe fit`, offline.",
        epilog="example:\n  gradprobe example signs --output signs\n  gradprobe fit "
        "--classifier signs/classifier.pt --train-data signs/train --output signs/model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    example.add_argument("name", choices=("signs",), help="which example")
    example.add_argument("--output", type=Path, required=True, help="folder to write")
    example.add_argument("--per-class", type=int, default=300, help="images per class")
    example.add_argument("--size", type=int, default=32, help="image side in pixels")
    example.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    example.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    example.set_defaults(func=cmd_example)


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
        help="a model dir (made by `gradprobe fit`); default: the built-in Fashion-MNIST "
        "example, built if absent",
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
    feats.add_argument("--images", type=Path, required=True, help=f".npy file: {GENERIC_EXPECTED}")
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
        help="(re)build the built-in example's classifier",
        description="Train the built-in example's Fashion-MNIST CNN reproducibly (fixed seed) "
        "from the Debian package dataset-fashion-mnist and export it (torch.export) with its "
        "manifest. `gradprobe fit` then makes the rest of the model dir, as for any "
        "classifier; the command is printed at the end. Commands without --model-dir build "
        "both on first use.",
    )
    train.add_argument("--force", action="store_true", help="rebuild even if it exists")
    train.add_argument(
        "--output-dir", type=Path, default=None, help="build into this folder instead of the cache"
    )
    train.add_argument(
        "--fit",
        action="store_true",
        help="then run the `gradprobe fit` it prints, into the default model dir (what "
        "`serve` without --model-dir serves)",
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
    _add_fit_commands(sub)
    return parser


def cmd_archive(args: argparse.Namespace) -> int:
    from service.artifacts import default_classifier_dir, default_classifier_only, default_model_dir
    from service.registry import DEFAULT_MODEL_NAME
    from service.torchserve_archive import ArchiveOptions, build_archive

    # The archive holds the classifier only (the detector runs in the sidecar). It is named
    # after the model dir; the built-in example's dir name is a hash, so its archive takes the
    # name GradProbe serves it under.
    model_dir = args.model_dir or default_classifier_only(quiet=args.quiet)
    builtin = (default_model_dir().resolve(), default_classifier_dir().resolve())
    is_default = args.model_dir is None or model_dir.resolve() in builtin
    name = args.name or (DEFAULT_MODEL_NAME if is_default else None)
    options = ArchiveOptions(
        mode=args.mode,
        target=args.target,
        timeout_ms=args.timeout_ms,
        on_unreliable=args.on_unreliable,
        on_unavailable=args.on_unavailable,
        model=args.model,
        batch_size=args.ts_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        workers=args.workers,
    )
    try:
        path = build_archive(
            model_dir, args.export_path, name=name, options=options, force=args.force
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
            "Write a TorchServe model archive: the model dir's classifier (torch.export or "
            "TorchScript), its manifest (the handler reads the input shape, channels, classes "
            "and normalization from it), the GradProbe handler (deploy/torchserve/) and the "
            "gRPC stubs. TorchServe serves predictions as usual and asks the GradProbe sidecar "
            "for a verdict per batch. The --mode/--target/--timeout-ms/--on-*/--model values go "
            "to the archive's model-config.yaml; at run time GRADPROBE_TS_MODE, "
            "GRADPROBE_TS_TARGET, GRADPROBE_TS_TIMEOUT_MS, GRADPROBE_TS_ON_UNRELIABLE, "
            "GRADPROBE_TS_ON_UNAVAILABLE and GRADPROBE_TS_MODEL override them.",
            width=88,
            break_on_hyphens=False,  # keep model-config.yaml whole
        ),
        epilog="example:\n  gradprobe archive --mode gate --on-unreliable refuse "
        "--export-path model-store\n  torchserve --start --model-store model-store "
        "--models fashion=fashion.mar --disable-token-auth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    archive.add_argument(
        "--export-path", type=Path, default=Path("model-store"), help="folder (default model-store)"
    )
    archive.add_argument(
        "--name",
        default=None,
        help="TorchServe's model name and the archive's file name (default: the model dir's "
        "name; fashion for the built-in example)",
    )
    archive.add_argument(
        "--model",
        default="",
        help="GradProbe's name for this classifier, sent with every request (see ListModels; "
        "default: empty, the only model GradProbe serves)",
    )
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
    from detectors.detector import DetectorMismatch
    from detectors.fit.data import DataError
    from detectors.fit.fashion_mnist import DatasetMissing
    from detectors.spec import ArtifactError
    from service.artifacts import FitUnavailable

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    try:
        return args.func(args)
    except (
        InvalidInput,
        UsageError,
        ArtifactError,
        DatasetMissing,
        DataError,
        DetectorMismatch,
        FitUnavailable,
    ) as exc:
        print(f"gradprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
