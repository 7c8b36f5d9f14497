"""Fitting: ``gradprobe fit`` — a user's classifier file and clean images in, a model dir out.

1. The classifier file is copied into the model dir with a manifest (format, sha256, input
   shape, classes, layers), then loaded back through the same checked path that serving uses.
2. Challenge data is made for this domain from the user's images (``detectors.fit.challenge``).
3. Gradient signals of every challenge image; the KNN and Mahalanobis banks are fitted on the
   user's clean training images only.
4. H is fitted on train, temperature-scaled on val, and its operating point set on val's clean
   images for the target false-positive rate; it is exported to ``detector/``.
5. The held-out report (test split: sources never seen by H) goes to ``report/``.

The model dir is written in a staging folder and moved into place only when all of it is
there; every expensive step is cached, so an interrupted fit resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from detectors import detector as detector_module
from detectors.fit.challenge.dataset import FAMILIES, SPLITS, ChallengeSplit
from detectors.fit.data import DataError, LabelledImages, load_labelled, load_unlabelled, survey
from detectors.fit.domain import (
    FitRecipe,
    Sources,
    build_split,
    cache_key,
    load_or_build_split,
    scaled_eps,
    split_sources,
    split_val_sources,
)
from detectors.fit.plan import Plan
from detectors.fit.prepared import PreparedData, split_signals, vectors
from detectors.gradients import GradientFeatures
from detectors.importer import load_program
from detectors.model_dir import (
    DETECTOR_DIR,
    REPORT_DIR,
    ClassCountMismatch,
    LoadedClassifier,
    atomic_dir,
    gradprobe_home,
    load_classifier,
    sha256_file,
)
from detectors.signals import PORTABLE_GROUPS, SignalFeaturizer, embed
from detectors.spec import MODEL_FILES, ArtifactError, Manifest, ModelSpec

# Ranked gradient columns kept per layer: the most plausible labels carry the signal, and the
# summary columns cover the rest whatever the class count.
MAX_RANKS = 8
FORMAT_BY_SUFFIX = {
    ".pt2": "torch.export",
    **{suffix: "torchscript" for suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript")},
}


@dataclass
class FitOptions:
    """Everything ``gradprobe fit`` takes besides the three paths."""

    val_data: Path | None = None
    ood_data: list[Path] = field(default_factory=list)
    target_fpr: float = 0.02
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_shape: tuple[int, int, int] | None = None
    recipe: FitRecipe = field(default_factory=FitRecipe)
    # Scale the recipe down when its measured cost would exceed this (None: never).
    time_limit_s: float | None = 45 * 60
    report: bool = True
    leave_one_out: bool = True
    resize: bool = False
    progress: bool = True


def classifier_format(path: Path) -> str:
    fmt = FORMAT_BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise ArtifactError(
            f"{path}: cannot tell the classifier's format from its name; use .pt2 for a "
            "torch.export program or .pt for a TorchScript file"
        )
    return fmt


def _note(options: FitOptions, message: str) -> None:
    if options.progress:
        print(f"[fit] {message}", file=sys.stderr, flush=True)


def _probe_shape(
    path: Path, fmt: str, shape: tuple[int, int, int], fixed: bool
) -> tuple[int, int, int]:
    """The data's (C, H, W), or the other channel count when only that one runs the model."""
    candidates = [shape] if fixed else [shape, (4 - shape[0], *shape[1:])]
    errors = []
    for candidate in candidates:
        try:
            _, _, original = load_program(path, fmt, candidate)
            with torch.no_grad():
                original(torch.rand(2, *candidate))
            return candidate
        except Exception as exc:
            errors.append(f"{list(candidate)}: {str(exc).splitlines()[0][:200]}")
    raise ArtifactError(
        f"{path} does not take the images' shape ({'; '.join(errors)}); pass --input-shape "
        "C,H,W if the model expects another size"
    )


def origin_manifest(classifier: Path) -> Manifest | None:
    """The manifest beside the classifier file when the file is that model dir's own (a
    classifier from `gradprobe train-model`, or one fitted before): its name and training
    record carry over."""
    try:
        manifest = Manifest.read(classifier.parent)
    except ArtifactError:
        return None
    if manifest.file != classifier.name or manifest.sha256 != sha256_file(classifier):
        return None
    return manifest


def write_classifier(
    classifier: Path, staging: Path, spec: ModelSpec, data: LabelledImages, options: FitOptions
) -> LoadedClassifier:
    """Copy the file into the model dir with its manifest, then load it through the checked
    path serving uses; the layers, known once it is lifted, complete the manifest."""
    fmt = classifier_format(classifier)
    origin = origin_manifest(classifier)
    target = staging / MODEL_FILES[fmt]
    shutil.copyfile(classifier, target)
    manifest = Manifest(
        architecture=origin.architecture if origin else f"user:{classifier.stem}",
        format=fmt,
        file=target.name,
        sha256=sha256_file(target),
        input_shape=list(spec.input_shape),
        input_dtype="float32",
        input_range=[0.0, 1.0],
        classes=list(spec.classes),
        layers=[],
        data_sha256=data.digest,
        torch_version=torch.__version__,
        normalization=_normalization(spec),
        resize=options.resize,
    )
    manifest.write(staging)
    loaded = load_classifier(staging)
    loaded.manifest.layers = GradientFeatures(loaded.module).layer_names
    loaded.manifest.write(staging)
    return loaded


def _normalization(spec: ModelSpec) -> dict[str, list[float]] | None:
    if spec.mean is None or spec.std is None:
        return None
    return {"mean": list(spec.mean), "std": list(spec.std)}


def _predictions(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    logits, _ = embed(model, images, batch=256)
    return logits.argmax(1)


def prepare_data(
    loaded: LoadedClassifier,
    train: LabelledImages,
    val: LabelledImages | None,
    user_ood: dict[str, np.ndarray],
    options: FitOptions,
) -> tuple[PreparedData, Sources, dict]:
    """Challenge splits and their gradient signals, cached by content."""
    from detectors.fingerprint import code_fingerprint

    recipe = options.recipe
    model = loaded.module
    sources_idx = split_sources(len(train), recipe.seed, val is not None)
    images = {s: train.images[i] for s, i in sources_idx.items()}
    labels = {s: train.labels[i] for s, i in sources_idx.items()}
    if val is not None:
        for s, i in split_val_sources(len(val), recipe.seed).items():
            images[s], labels[s] = val.images[i], val.labels[i]
    for split in SPLITS:
        if len(images[split]) < 2:
            raise DataError(f"too few images for a {split} split: give at least 20 images")
    sources = Sources(images, labels)
    # Everything the challenge images depend on: the data, the model as lifted (its file,
    # input shape and the normalization GradProbe applies), and the user's OOD sets' bytes.
    digests = [train.digest, val.digest if val else "", json.dumps(loaded.manifest.input_shape)]
    digests += [json.dumps(loaded.manifest.normalization)]
    digests += [
        f"{name}:{hashlib.sha256(x.tobytes()).hexdigest()}" for name, x in sorted(user_ood.items())
    ]
    # The challenge images depend on the data, the classifier and the recipe; their gradient
    # signals also on the engine's code, so they are cached per engine version beside them.
    engine = code_fingerprint(_engine_files())[:12]
    key = cache_key(loaded.manifest.sha256, "|".join(digests), recipe)
    folder = gradprobe_home() / "fit" / key
    folder.mkdir(parents=True, exist_ok=True)
    eps_file = folder / "eps.json"
    if eps_file.exists():
        eps = tuple(json.loads(eps_file.read_text()))
    else:
        _note(options, "scaling the attacks' L∞ budgets to this classifier")
        right = _predictions(model, images["train"]) == labels["train"]
        if right.sum() < 8:
            raise DataError(
                "the classifier gets fewer than 8 of its training images right: check the "
                "classes (sorted folder names), the input range and --mean/--std"
            )
        eps = scaled_eps(model, images["train"][right], labels["train"][right], recipe.seed)
        eps_file.write_text(json.dumps(list(eps)))
    _note(options, f"attack budgets (L∞): {', '.join(f'{e * 255:.3g}/255' for e in eps)}")
    splits: dict[str, ChallengeSplit] = {}
    signals = {}
    for split in SPLITS:
        ood_part = {
            f"user:{name}": _ood_share(x, split, recipe.seed) for name, x in user_ood.items()
        }

        def build(split: str = split, ood_part: dict = ood_part) -> ChallengeSplit:
            _note(options, f"challenge data: {split} split")
            return build_split(
                model, split, sources, recipe, eps, ood_part, progress=options.progress
            )

        splits[split] = load_or_build_split(folder, split, build)
        signals[split] = split_signals(
            model,
            splits[split],
            folder / f"signals-{split}-{engine}.npz",
            progress=options.progress,
        )
    summary = {"recipe": asdict(recipe), "eps": list(eps), "cache": str(folder)}
    return PreparedData(splits, signals, recipe), sources, summary  # type: ignore[arg-type]


def _engine_files() -> list[Path]:
    from detectors import gradients, layer_norms, stability, traced_backward

    return [Path(m.__file__) for m in (gradients, layer_norms, stability, traced_backward)]


def _ood_share(images: np.ndarray, split: str, seed: int) -> np.ndarray:
    """The user's OOD images split 60/15/25 like the clean ones (disjoint)."""
    order = np.random.default_rng([seed, 13]).permutation(len(images))
    bounds = np.cumsum([0, 0.6, 0.15, 0.25]) * len(images)
    i = SPLITS.index(split)
    return images[np.sort(order[round(bounds[i]) : round(bounds[i + 1])])]


def fit_featurizer(
    model: torch.nn.Module, sources: Sources, groups: tuple[str, ...]
) -> SignalFeaturizer:
    """KNN bank and Mahalanobis statistics from the user's clean training images."""
    _, embeddings = embed(model, sources.images["train"], batch=256)
    featurizer = SignalFeaturizer(groups=groups, max_ranks=MAX_RANKS)
    return featurizer.fit(embeddings, sources.labels["train"], images=sources.images["train"])


def fit(classifier: Path, train_data: Path, output: Path, options: FitOptions) -> Path:
    """Build ``output`` (a model dir) from the classifier file and the user's images."""
    classifier, train_data, output = Path(classifier), Path(train_data), Path(output)
    if not classifier.is_file():
        raise ArtifactError(f"{classifier} is not a file")
    fmt = classifier_format(classifier)
    shape = options.input_shape or survey(train_data)
    shape = _probe_shape(classifier, fmt, shape, fixed=options.input_shape is not None)
    _note(options, f"{fmt} classifier, input {list(shape)}; reading {train_data}")
    train = load_labelled(train_data, shape, quiet=not options.progress)
    if train.resized:
        _note(options, f"{train.resized} training images were resized to {shape[2]}×{shape[1]}")
    val = None
    if options.val_data is not None:
        val = load_labelled(options.val_data, shape, train.classes, quiet=not options.progress)
    user_ood: dict[str, np.ndarray] = {}
    for path in options.ood_data:
        name = Path(path).stem or "ood"
        while name in user_ood:  # two folders of one name stay two sets
            name += "_"
        user_ood[name] = load_unlabelled(path, shape, quiet=not options.progress)
    spec = ModelSpec(
        input_shape=shape,
        classes=tuple(train.classes),
        mean=options.mean,
        std=options.std,
        resize=options.resize,
    )
    with atomic_dir(output) as staging:
        try:
            loaded = write_classifier(classifier, staging, spec, train, options)
        except ClassCountMismatch as exc:
            shown = ", ".join(train.classes[:8]) + ("…" if len(train.classes) > 8 else "")
            raise DataError(
                f"{exc}; the training data has {len(train.classes)} classes ({shown})"
            ) from None
        options, time_plan = _planned(options, loaded, train, val, len(user_ood))
        data, sources, summary = prepare_data(loaded, train, val, user_ood, options)
        summary["time_plan"] = asdict(time_plan)
        predicted = _predictions(loaded.module, sources.images["test"])
        accuracy = float((predicted == sources.labels["test"]).mean())
        manifest = loaded.manifest
        manifest.test_accuracy = round(accuracy, 6)
        origin = origin_manifest(classifier)
        if origin is not None and "classifier_training" in origin.recipe:  # fitted before
            summary["classifier_training"] = origin.recipe["classifier_training"]
        elif origin is not None and origin.recipe and "eps" not in origin.recipe:
            summary["classifier_training"] = origin.recipe  # as `train-model` recorded it
        manifest.recipe = summary
        manifest.write(staging)
        _note(options, f"classifier accuracy on the held-out split: {accuracy:.2%}")
        detector = train_detector(loaded, data, sources, staging / DETECTOR_DIR, options)
        if options.report:
            from detectors.fit.report import PORTABLE_ABLATION, write_report

            _note(options, "held-out report (peers, leave-one-kind-out, ablation)")
            write_report(
                data,
                loaded.module,
                detector,
                staging / REPORT_DIR,
                progress=options.progress,
                leave_out=options.leave_one_out,
                reference=(sources.images["train"], sources.labels["train"]),
                make_featurizer=lambda groups: fit_featurizer(loaded.module, sources, groups),
                ablation_sets=PORTABLE_ABLATION,
                intro=user_intro(manifest),
                caveat="",
            )
    _note(options, f"model dir ready: {output}")
    return output


def _planned(
    options: FitOptions,
    loaded: LoadedClassifier,
    train: LabelledImages,
    val: LabelledImages | None,
    user_ood_sets: int,
) -> tuple[FitOptions, Plan]:
    """``options`` with the recipe sized to the time limit (``detectors.fit.plan``), and the
    plan."""
    import os

    from detectors.fit import plan as planning

    identity = {
        "classifier": loaded.manifest.sha256,
        "data": [train.digest, val.digest if val else ""],
        "recipe": asdict(options.recipe),
        "limit": options.time_limit_s,
        "user_ood_sets": user_ood_sets,
        # Measured here: another machine (or thread count) measures again.
        "machine": [os.cpu_count(), torch.get_num_threads(), torch.__version__],
    }

    def make() -> planning.Plan:
        _note(options, "measuring this classifier's cost per image")
        costs = planning.measure_costs(loaded.module, train.images, train.labels)
        return planning.plan(options.recipe, costs, options.time_limit_s, user_ood_sets)

    chosen = planning.stored_plan(gradprobe_home() / "fit" / "plans", identity, make)
    costs = chosen.costs
    _note(
        options,
        f"per image: {costs.features_s * 1e3:.3g} ms of gradient features, "
        f"{costs.gradient_s * 1e3:.3g} ms per attack step, {costs.correct_share:.0%} of the "
        f"images classified right (attacked); challenge data at the requested "
        f"size: about {chosen.estimate_s / 60:.0f} min",
    )
    if chosen.factor >= 1:
        return options, chosen
    limit = (options.time_limit_s or 0) / 60
    if chosen.within:
        _note(
            options,
            f"scaling every challenge-image count by {chosen.factor:.3g} to stay within "
            f"--time-limit {limit:.0f} min (about {chosen.planned_s / 60:.0f} min); a larger "
            "limit gives H more to learn from",
        )
    else:
        _note(
            options,
            f"even the smallest challenge data takes about {chosen.planned_s / 60:.0f} min "
            f"here, past --time-limit {limit:.0f} min: building that (about "
            f"{chosen.factor:.3g} of the requested counts)",
        )
    return replace(options, recipe=chosen.recipe(options.recipe)), chosen


def train_detector(
    loaded: LoadedClassifier,
    data: PreparedData,
    sources: Sources,
    out_dir: Path,
    options: FitOptions,
) -> detector_module.OnnxDetector:
    from sklearn.metrics import f1_score

    featurizer = fit_featurizer(loaded.module, sources, PORTABLE_GROUPS)
    columns = featurizer.column_names(len(loaded.manifest.classes), list(loaded.manifest.layers))
    x = {s: vectors(featurizer, data.signals[s], data.splits[s].images) for s in SPLITS}
    y = {s: data.splits[s].family for s in SPLITS}
    missing = [FAMILIES[f] for f in range(len(FAMILIES)) if not (y["train"] == f).any()]
    if missing:
        raise DataError(
            f"no {', '.join(missing)} images could be made for training H (are the attacks "
            "failing on every image?); give more training images"
        )
    _note(options, f"fitting H on {len(y['train'])} images, {x['train'].shape[1]} signals")
    trained = detector_module.fit(
        featurizer, columns, x["train"], y["train"], x["val"], y["val"], guard=True
    )
    unseen = trained.holdout if trained.holdout is not None else np.ones(len(y["val"]), bool)
    val_probs = trained.predict_proba_vectors(x["val"][unseen])
    clean_probs = val_probs[y["val"][unseen] == 0]
    threshold = detector_module.threshold_for_fpr(clean_probs, options.target_fpr)
    probs = trained.predict_proba_vectors(x["test"])
    predicted = detector_module.verdict_indices(probs, threshold)
    metrics = {
        "test_accuracy": float((predicted == y["test"]).mean()),
        "test_macro_f1": float(f1_score(y["test"], predicted, average="macro")),
        "test_clean_in_distribution": float((predicted[y["test"] == 0] == 0).mean()),
        "test_ece": detector_module.expected_calibration_error(probs, y["test"]),
        "target_fpr": options.target_fpr,
    }
    staging = out_dir.with_name(out_dir.name + ".building")
    detector_module.export(
        trained,
        staging,
        classifier_sha256=loaded.manifest.sha256,
        training_data={
            "recipe": asdict(options.recipe),
            "counts": {
                s: {k: int(n) for k, n in zip(*np.unique(d.kind, return_counts=True), strict=True)}
                for s, d in data.splits.items()
            },
            "attack_success_rates": {s: d.attack_success for s, d in data.splits.items()},
            "note": "the user's images split by source into train/val/test; adversarial "
            "images are successful attacks on images the classifier got right",
        },
        metrics=metrics,
        threshold=threshold,
    )
    staging.rename(out_dir)
    _note(
        options,
        f"H: held-out macro-F1 {metrics['test_macro_f1']:.3f}, clean images called "
        f"in_distribution {metrics['test_clean_in_distribution']:.1%} (target "
        f"{1 - options.target_fpr:.0%})",
    )
    return detector_module.OnnxDetector(out_dir, loaded.manifest.sha256)


def user_intro(manifest: Manifest) -> str:
    c, h, w = manifest.input_shape
    return (
        f"Written by `gradprobe fit` (`gradprobe evaluate --model-dir` shows where). Classifier: "
        f"{manifest.architecture} ({manifest.format}), input {c}×{h}×{w}, "
        f"{len(manifest.classes)} classes, held-out accuracy {manifest.test_accuracy:.2%}. "
        "Test split: the user's images whose sources never appear in H's training or "
        "validation data, and the challenge images made from them; peers from pytorch-ood "
        "on the same classifier and images, fitted on the same clean training images. "
        "Scores: AUROC of 'challenge vs clean' (higher is better).\n\n"
        "H's inputs: the ranked log gradient norms of the most plausible labels and their "
        "per-layer mean, spread and maximum over all labels, the peers' cheap signals "
        "(max softmax, energy, max logit, top-two logit margin, KNN and Mahalanobis "
        "distances), and statistics of the image (brightness, clipping, sharpness, noise, "
        "colour, JPEG blocks, the outer frame's brightness) only as "
        "z-scores against the user's clean training images, with their distance from them, "
        "and where the image puts its brightness and detail on an 8×8 grid, cell by cell "
        "against where the clean images put theirs: nothing assumes a background, a size or "
        "a class count. P(in_distribution) also "
        "answers to the novelty guard (`detectors/guard.py`): an image far into the clean "
        "images' tails on any one-class signal (KNN, Mahalanobis, energy, max softmax, top-two "
        "logit margin, image distance, and how far the softmax moves when the image is "
        "squeezed by a half-pixel blur or a 2×2 median: feature squeezing, "
        "`detectors/stability.py`, which only the guard reads) is not called clean, whatever "
        "the kinds H was trained on."
    )
