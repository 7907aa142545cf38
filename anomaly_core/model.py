"""The method as one object: fit on good images, score images, save and load.

    model = Model.fit(good_pixels, config=ModelConfig())        # [N, S, S, 3] uint8, S = config.input_size
    result = model.score(pixels)                                 # ScoreResult: scores, grids, maps
    model.save("models/plate")                                   # or "s3://bucket/models/plate"
    model = Model.load("models/plate")

Everything runs in this process. The Ray jobs (jobs/fit.py, jobs/score.py) run the same steps
(anomaly_core.features, anomaly_core.fit) over distributed blocks, and build a Model from the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from anomaly_core.align import align_images
from anomaly_core.artifact import load_artifact, save_model
from anomaly_core.config import ModelConfig
from anomaly_core.features import FeatureExtractor, augment_batch
from anomaly_core.fit import (
    CalibrationPatches,
    FitStats,
    SplitPlan,
    aligned_config,
    alignment_trial,
    feature_blocks,
    fit_bank,
    fitted_config,
    images_per_block,
    mark_folds,
    split_calibration,
    trial_sample,
)
from anomaly_core.image_term import ImageTerm, image_distances
from anomaly_core.images import size_range
from anomaly_core.index import MemoryBank
from anomaly_core.scoring import image_maps, image_scores, patch_distances
from anomaly_core.storage import StorageOptions
from anomaly_core.threshold import Calibration
from anomaly_core.update import merge_sizes, update_bank, update_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    """Scores of a batch of B images."""
    scores: np.ndarray             # [B] float32 image anomaly scores (Model.is_anomalous gives the verdicts)
    distances: np.ndarray          # [B, G, G] float32 patch distances (G = grid_size; the aligned frame if aligned)
    maps: np.ndarray | None        # [B, S, S] float32 anomaly maps in the image's frame (S = input_size); None
                                   # when not asked for (the score job builds them on the device instead)
    poses: np.ndarray | None = None    # [B, 3] poses the grids were scored in (anomaly_core.align), if aligned
    # [B] float32 the image-level term in score units (ImageTerm.in_score_units), for models with one
    image_term_scores: np.ndarray | None = None


def score_features(features: np.ndarray, bank: MemoryBank, *, config: ModelConfig,
                   foreground: np.ndarray | None = None, poses: np.ndarray | None = None, maps: bool = True,
                   device: str | torch.device = "cpu", image_term: ImageTerm | None = None,
                   images: np.ndarray | None = None) -> ScoreResult:
    """Descriptors [B, G*G, D] unit rows and foreground [B, G*G] bool (None: everywhere) -> ScoreResult
    against `bank` (Model.score_features with the model's own bank; benchmarks pass banks of their own).
    poses: [B, 3] when the descriptors are of aligned images (maps are turned back by them). maps: build
    the maps (image_maps, on `device`). image_term: the model's (None: none), which combines the patch
    score with the image descriptors [B, D'] (anomaly_core.image_term)."""
    b, g = len(features), config.grid_size
    dist = patch_distances(features, bank, foreground=foreground)                        # [B, G*G]
    grid = dist.reshape(b, g, g)                                                         # [B, G, G]
    scores = image_scores(grid, **config.score_options)                                  # [B]
    term_scores = None
    if image_term is not None:
        if images is None:
            raise ValueError("the model has an image term (global_block): pass the image descriptors "
                             "(FeatureExtractor.describe_all)")
        term_scores = image_term.in_score_units(image_distances(images, image_term.index))  # [B]
        scores = np.maximum(scores, term_scores)                                         # [B]
    amaps = None
    if maps:
        amaps = image_maps(torch.from_numpy(grid).to(device), out_size=config.input_size, sigma=config.map_sigma,
                           poses=poses).cpu().numpy()
    return ScoreResult(scores=scores, distances=grid, maps=amaps, poses=poses, image_term_scores=term_scores)


class Model:
    """A fitted model: its config, memory bank, calibrated threshold, the backbone weights it was fitted
    with (identity record) and the fit's statistics; for an updated model, its lineage (its parent's id
    and what the update added). `manifest` is set once saved or loaded."""

    def __init__(self, *, config: ModelConfig, bank: MemoryBank, calibration: Calibration, weights: dict | None,
                 stats: FitStats, manifest: dict | None = None, lineage: dict | None = None):
        if config.align is None:
            raise ValueError("config.align=None is chosen by the fit (anomaly_core.fit.aligned_config): give the "
                             "fitted config, or set align")
        if (config.global_block is None) != (stats.image_term is None):
            raise ValueError(f"config.global_block={config.global_block} but the fit statistics "
                             f"{'lack' if stats.image_term is None else 'hold'} an image term: fit the model anew")
        self.config, self.bank, self.calibration = config, bank, calibration
        # a training patch lies within the cover radius of the bank, so an approximate index's misses above it
        # are what can turn a verdict: those rows are searched again exhaustively (MemoryBank exact_above)
        bank.exact_above = stats.cover_radius
        self.weights, self.stats, self.manifest = weights, stats, manifest
        self.lineage = lineage            # {"parent": model id, "added": ...} for a model made by update
        self._extractor: FeatureExtractor | None = None

    # ---- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, pixels: np.ndarray, *, config: ModelConfig, names: Sequence[str] | None = None,
            device: str = "auto", batch_size: int = 16, sizes: np.ndarray | None = None) -> Model:
        """Fit on good images [N, S, S, 3] uint8 (S = config.input_size; anomaly_core.images.resize_square
        makes them). names: [N] (default "0".."N-1"); they decide the hold-out split, as URIs do in the
        fit job (split_calibration). Augmented copies (config.augment) are made of the bank images only.
        sizes: [N, 2] int (width, height) of the images before the resize, recorded so that scoring gives
        no normal verdict to images far outside them (anomaly_core.images.size_mismatch); None: unknown.
        align=None: the alignment trial on a seeded sample of the images decides (anomaly_core.fit.aligned_config)."""
        t0 = time.perf_counter()
        names = [str(i) for i in range(len(pixels))] if names is None else [str(x) for x in names]
        plan = split_calibration(names, config=config)
        extractor = FeatureExtractor(config=config, device=device)

        def trial():
            sample = set(trial_sample(names, seed=config.seed))
            picked = [i for i, n in enumerate(names) if n in sample]                   # in `names` order
            return alignment_trial(pixels[picked], describe=extractor.describe, config=config) if picked else None
        config, align_trial = aligned_config(config, trial)
        extractor.config = config                                 # alignment does not change the backbone
        t_features = time.perf_counter()
        rows = _feature_rows(extractor, pixels, names, plan=plan, batch_size=batch_size)
        t_feat = time.perf_counter() - t_features
        model = cls.fit_features(rows["features"], config=config, plan=replace(plan, fold=rows["fold"]),
                                 foreground=rows["foreground"], paths=rows["path"], copy=rows["copy"],
                                 images=rows.get("image"), weights=extractor.backbone.identity,
                                 search_device=extractor.backbone.device.type)
        model._extractor = extractor
        model.bank.place(extractor.backbone.device)
        model.stats = replace(model.stats, feature_seconds=round(t_feat, 2),
                              fit_seconds=round(time.perf_counter() - t0, 2), alignment_trial=align_trial,
                              input_sizes=None if sizes is None else size_range(*np.asarray(sizes).T))
        return model

    @classmethod
    def fit_features(cls, features: np.ndarray, *, config: ModelConfig, plan: SplitPlan | None = None,
                     foreground: np.ndarray | None = None, paths: Sequence[str] | None = None,
                     copy: np.ndarray | None = None, images: np.ndarray | None = None, weights: dict | None = None,
                     search_device: str = "cpu") -> Model:
        """Fit on descriptors [N, P, D] float32 of good images (FeatureExtractor's; augmented copies as rows
        of their own, marked by copy [N] int, 0 = the image itself). plan: which rows calibrate (its fold
        is per row; None: split_calibration of the paths); foreground: [N, P] bool (None: everywhere);
        paths: [N] names (None: "0".."N-1"); images: [N, D'] image descriptors (needed with a
        global_block); weights: the backbone's identity record (needed to save);
        search_device: where the model will be scored (sets what index="auto" chooses; fit_bank).
        align=None takes the descriptors as unaligned (the alignment trial needs pixels: Model.fit)."""
        names = [str(i) for i in range(len(features))] if paths is None else [str(p) for p in paths]
        plan = plan or split_calibration(names, config=config)
        if config.align is None:                           # the trial needs pixels (Model.fit): taken as given
            config = replace(config, align=False)
        config = fitted_config(config, plan=plan, names=names)
        blocks = feature_blocks(features, plan.fold, images_per_block=images_per_block(config),
                                foreground=foreground, paths=names, copy=copy,
                                images=image_rows(images, config=config, n=len(names)))
        n_bank_rows = len(names) if plan.crossfit else int((plan.fold != 0).sum())
        bank, calibration, stats = fit_bank(blocks, config=config, plan=plan,
                                            n_estimate=n_bank_rows * config.grid_size ** 2,
                                            search_device=search_device)
        return cls(config=config, bank=bank, calibration=calibration, weights=weights, stats=stats)

    # ---- incremental update ------------------------------------------------------------------------
    def update(self, pixels: np.ndarray, *, names: Sequence[str] | None = None, max_added: int | None = None,
               batch_size: int = 16, sizes: np.ndarray | None = None) -> Model:
        """A new model whose bank also covers the good images [N, S, S, 3] uint8 (anomaly_core.update): only
        these are read and described, never the images this model was fitted on. names: [N] (default
        "new-0".."new-N-1"; they decide which are held out to calibrate); max_added: most vectors added
        (None: coreset_ratio of the candidates, anomaly_core.update); sizes: [N, 2] original (width,
        height), None: unknown.
        This model is not modified; the new one records it as its parent (it must have been saved)."""
        t0 = time.perf_counter()
        names = [f"new-{i}" for i in range(len(pixels))] if names is None else [str(x) for x in names]
        plan = update_split(names, config=self.config)
        extractor = self.backbone()
        rows = _feature_rows(extractor, pixels, names, plan=plan, batch_size=batch_size)
        t_feat = time.perf_counter() - t0
        model = self.update_features(rows["features"], foreground=rows["foreground"], paths=rows["path"],
                                     copy=rows["copy"], fold=rows["fold"], plan=plan, max_added=max_added,
                                     sizes=sizes, images=rows.get("image"))
        model._extractor = extractor
        model.bank.place(extractor.backbone.device)
        model.stats = replace(model.stats, feature_seconds=round(t_feat, 2),
                              fit_seconds=round(time.perf_counter() - t0, 2))
        model.lineage["added"]["seconds"] = model.stats.fit_seconds
        return model

    def update_features(self, features: np.ndarray, *, paths: Sequence[str], foreground: np.ndarray | None = None,
                        copy: np.ndarray | None = None, fold: np.ndarray | None = None,
                        plan: SplitPlan | None = None, max_added: int | None = None,
                        sizes: np.ndarray | None = None, images: np.ndarray | None = None) -> Model:
        """Model.update on descriptors [N, P, D] float32 of the new good images (rows as Model.fit_features
        takes them, images [N, D'] too; fold [N] per row, default plan's). plan: update_split of the names
        when not given. sizes: [N_images, 2] original (width, height) of the new images, None: unknown."""
        names = [str(p) for p in paths]
        plan = plan if plan is not None else update_split(names, config=self.config)
        if fold is None:
            fold = plan.fold if plan is not None else np.full(len(names), -1, dtype=np.int16)
        blocks = feature_blocks(features, fold, images_per_block=images_per_block(self.config),
                                foreground=foreground, paths=names, copy=copy,
                                images=image_rows(images, config=self.config, n=len(names)))
        bank, calibration, stats, added = update_bank(blocks, config=self.config, bank=self.bank, stats=self.stats,
                                                      plan=plan, max_added=max_added)
        if sizes is not None:
            stats = replace(stats, input_sizes=merge_sizes(self.stats.input_sizes, size_range(*np.asarray(sizes).T)))
        return Model(config=self.config, bank=bank, calibration=calibration, weights=self.weights, stats=stats,
                     lineage={"parent": self.model_id, "added": added})

    # ---- scoring ---------------------------------------------------------------------------------------
    def backbone(self, *, device: str = "auto", num_threads: int | None = None) -> FeatureExtractor:
        """The model's feature extractor, loaded on the first call (later calls return it as it is), with
        the bank placed for search on the same device (MemoryBank.place, which logs the search path).
        Refuses weights whose tensors differ from those the model was fitted with."""
        if self._extractor is None:
            extractor = FeatureExtractor(config=self.config, device=device, num_threads=num_threads)
            got = extractor.backbone.identity["state_sha256"]
            if self.weights is not None and got != self.weights["state_sha256"]:
                raise ValueError(f"model {self.name} was fitted with weights {self.weights} but "
                                 f"{self.config.weights!r} now loads tensors with sha256 {got[:12]}...; "
                                 f"install the same weights or refit")
            self._extractor = extractor
            self.bank.place(extractor.backbone.device)
        return self._extractor

    @property
    def device(self) -> torch.device:
        """Where the backbone runs, and the bank is searched and the maps are built (the CPU until loaded)."""
        return self._extractor.backbone.device if self._extractor is not None else torch.device("cpu")

    def score(self, pixels: np.ndarray, *, maps: bool = True) -> ScoreResult:
        """Images [B, S, S, 3] uint8 (S = config.input_size) -> their ScoreResult. Aligned first when the
        config says so; the maps are in each image's own frame. maps=False: scores and grids only."""
        poses = None
        if self.config.align:
            pixels, poses = align_images(pixels)                                 # [B, S, S, 3], [B, 3]
        features, foreground, images = self.backbone().describe_all(pixels)
        return self.score_features(features, foreground, poses=poses, maps=maps, images=images)

    def score_features(self, features: np.ndarray, foreground: np.ndarray | None = None, *,
                       poses: np.ndarray | None = None, maps: bool = True,
                       images: np.ndarray | None = None) -> ScoreResult:
        """Descriptors [B, G*G, D] and foreground [B, G*G] bool (None: everywhere) -> ScoreResult; poses
        [B, 3] when the descriptors are of aligned images; images [B, D'] their image descriptors (needed
        when the model has an image term, config.global_block)."""
        return score_features(features, self.bank, config=self.config, foreground=foreground, poses=poses,
                              maps=maps, device=self.device, image_term=self.stats.image_term, images=images)

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        """Image scores [B] -> verdicts [B] bool: at or above the calibrated threshold."""
        return np.asarray(scores) >= self.calibration.threshold

    # ---- storage ---------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        if self.manifest is None:
            raise ValueError("the model has no id until it is saved (Model.save)")
        return self.manifest["model_id"]

    @property
    def name(self) -> str:
        return self.manifest["model_id"] if self.manifest else "(not saved)"

    def save(self, uri: str, *, overwrite: bool = False, options: StorageOptions | None = None) -> dict:
        """Write the model folder (local or s3://; anomaly_core.artifact) and return its manifest."""
        if self.weights is None:
            raise ValueError("the model was fitted from features with weights=None; pass the backbone's "
                             "identity (FeatureExtractor(...).backbone.identity) to fit_features to save it")
        term, patches = self.stats.image_term, self.stats.calibration_patches
        self.manifest = save_model(uri, config=self.config, bank=self.bank, calibration=self.calibration.to_dict(),
                                   weights=self.weights, stats=self.stats.to_dict(), lineage=self.lineage,
                                   calibration_patches=(None if patches is None else
                                                        {k: v for k, v in asdict(patches).items() if v is not None}),
                                   image_term=term.standardisation() if term is not None else None,
                                   image_vectors=term.vectors if term is not None else None,
                                   overwrite=overwrite, options=options)
        return self.manifest

    @classmethod
    def load(cls, uri: str, options: StorageOptions | None = None, *, model_id: str | None = None) -> Model:
        """Load a model folder (local or s3://), every file checked against the manifest; model_id: the id
        it must have (a pinned model), checked before any bank file is read."""
        manifest, bank, arrays = load_artifact(uri, options, model_id=model_id)
        arrays = dict(arrays or {})
        vectors = arrays.pop("image_vectors", None)
        term = manifest.get("image_term")
        stats = replace(FitStats.from_dict(manifest["stats"]),
                        calibration_patches=CalibrationPatches(**arrays) if arrays else None,
                        image_term=None if vectors is None else ImageTerm(
                            vectors=vectors, **{k: v for k, v in term.items() if k != "vectors"}))
        return cls(config=ModelConfig.from_dict(manifest["config"]), bank=bank,
                   calibration=Calibration(**manifest["calibration"]), weights=manifest["weights"],
                   stats=stats, manifest=manifest,
                   lineage={"parent": manifest["parent"], "added": manifest["added"]} if "parent" in manifest else None)


def _feature_rows(extractor: FeatureExtractor, pixels: np.ndarray, names: list[str], *, plan: SplitPlan | None,
                  batch_size: int) -> dict[str, np.ndarray]:
    """Images [N, S, S, 3] uint8 named `names` -> rows {"path", "features" [R, P, D], "foreground" [R, P],
    "fold" [R], "copy" [R]}, and "image" [R, D'] with a global_block: the images, and augmented copies of
    the bank images when the config augments (plan None: none is held out; every fold -1)."""
    config = extractor.config
    held = plan.held_out(names) if plan is not None else frozenset()
    folds = plan.folds_of(names) if plan is not None else {}
    parts = []
    for s in range(0, len(names), batch_size):
        batch = {"path": np.array(names[s:s + batch_size], dtype=object),
                 "error": np.full(len(names[s:s + batch_size]), "", dtype=object),
                 "pixels": pixels[s:s + batch_size]}
        if config.n_augment > 1:
            batch = augment_batch(batch, name=config.augment, held=held)
        parts.append(mark_folds(extractor(batch), folds=folds))
    keys = ("path", "features", "foreground", "fold", "copy") + (("image",) if config.global_block is not None else ())
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def image_rows(images: np.ndarray | None, *, config: ModelConfig, n: int) -> np.ndarray | None:
    """The image descriptors [n, D'] a fit or update on n rows needs: required with a global_block, else
    unused (None)."""
    if config.global_block is None:
        return None
    if images is None or len(images) != n:
        raise ValueError(f"global_block={config.global_block}: the fit needs each row's image descriptor "
                         f"(FeatureExtractor.describe_all), [{n}, D]; got {None if images is None else images.shape}")
    return np.asarray(images, dtype=np.float32)
