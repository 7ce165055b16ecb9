"""DINO-Seg: identity reward on the *segmented* subject (paper section 6.1 and Appendix A.1).

For every generated image and its reference:

1. **Detect** the subject with GroundingDINO (``AutoModelForZeroShotObjectDetection``), the text query being
   the subject class name, lower-cased and ending in a period (``"dog."``) as GroundingDINO expects. The best
   detection is the box with the highest score among those above ``box_threshold`` (and ``text_threshold``
   for the matched phrase).
2. **Segment** it with SAM (``SamModel`` + ``SamProcessor``), prompted with that box, single-mask output
   (SAM's recommended mode for an unambiguous box prompt).
3. **Mask and crop**: pixels outside the mask are set to a constant (by default the DINOv2 processor's mean
   colour, which normalises to zero input), the image is cropped to the mask's bounding box and padded to a
   square with the same constant, so that the processor's centre crop cannot cut off an elongated subject.
4. **Embed** with DINOv2 (``Dinov2Model``; ViT-L/14 in the paper). ``pooling="cls"`` (default) uses the
   CLS token after the final LayerNorm (``pooler_output``), the usual DINO-score embedding; ``"cls+mean"``
   uses the CLS token concatenated with the mean of the patch tokens (as ``Dinov2ForImageClassification``
   does). With masked inputs the mean also averages background patches, so CLS is the cleaner identity
   signal.
5. **Score**: cosine between the two unit-norm embeddings, in [-1, 1].

References are segmented the same way with the same subject, and their embeddings are cached by content
hash (pixels + size + subject), since the G images of a group share one reference.

Fallbacks are counted in ``reward.stats`` so the trainer can log them: ``fallbacks`` -- no detection above the
thresholds, the *whole* image is embedded (masking nothing); ``empty_masks`` -- SAM returned an empty mask,
the detection box is used as the mask. ``stats`` also counts ``images`` (generated and reference images
segmented) and ``cache_hits``.

Several subjects in one image (:meth:`DinoSegReward.score_subjects`): every distinct class name of the image
is grounded separately and contributes up to K boxes (non-maximum suppression first, so one object is one
box); boxes of the same object found by two queries are merged. Every detection is segmented and embedded
as above and scored against every subject's reference; :func:`assign` then gives each subject at most one
detection and each detection at most one subject, maximising the total similarity (the Hungarian method,
``scipy.optimize.linear_sum_assignment``). A subject left without a detection scores 0. When nothing at all
is detected, the whole image is the one candidate (the single-subject fallback), so that for K = 1 the
scores equal the single-subject reward's exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from cgrpo.rewards._hf import (
    LRUCache,
    batches,
    image_hash,
    require_dir,
    resolve_device,
    resolve_dtype,
    to_model,
)
from cgrpo.rewards.base import BatchReward, ImageBatch, RewardBatch, check_subject_batches, register, to_pil

Box = list[float]  # [x0, y0, x1, y1] in pixels


def detection_query(subject: str | None, default: str = "object") -> str:
    """``"Dog"`` -> ``"dog."``: GroundingDINO wants lower-case phrases, each ending with a period."""
    text = (subject or "").strip().lower().rstrip(".").strip() or default
    return text + "."


def mask_and_crop(image: Image.Image, mask: np.ndarray | None, background: Sequence[int]) -> Image.Image:
    """Keep the masked subject on a constant background, cropped to the mask's box and padded to a square.

    ``mask``: bool ``[H, W]`` (``None`` or empty -> the whole image, unchanged apart from the square padding).
    Returns an RGB image of side ``max(box height, box width)``.
    """
    pixels = np.asarray(image.convert("RGB")).copy()
    fill = np.asarray(background, dtype=np.uint8)
    if mask is not None and mask.any():
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image size {pixels.shape[:2]}")
        pixels[~mask] = fill
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        pixels = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = pixels.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = pixels
    return Image.fromarray(square)


def clip_box(box: Sequence[float], image: Image.Image) -> Box | None:
    """The box clipped to the image; ``None`` when it is then under a pixel wide or high (no detection)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, x0), min(float(image.width), x1)
    y0, y1 = max(0.0, y0), min(float(image.height), y1)
    return [x0, y0, x1, y1] if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """A bool ``[H, W]`` mask that is True inside the pixel box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def box_iou(box: Sequence[float], others: np.ndarray) -> np.ndarray:
    """IoU of one pixel box ``(x0, y0, x1, y1)`` with each row of ``others`` ``[M, 4]``."""
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Indices of the boxes ``[M, 4]`` kept by greedy NMS, best score first (ties: the earlier box).

    Hand-written because torchvision (whose ``nms`` detectors usually call) cannot be installed beside the
    pinned torch; GroundingDINO returns a few hundred boxes at most, so the quadratic loop is cheap."""
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    keep: list[int] = []
    for i in order:
        if not keep or (box_iou(boxes[i], boxes[keep]) <= iou).all():
            keep.append(i)
    return keep


@dataclass(frozen=True)
class Assignment:
    """Detections matched to the subjects of one image (see :func:`assign`).

    ``scores`` ``[K]``: each subject's similarity to its detection, 0 for a missing subject;
    ``detection`` ``[K]``: the index of each subject's detection, -1 when it has none;
    ``missing``: subjects without a detection; ``confused``: subjects drawn twice (see :func:`assign`).
    """

    scores: np.ndarray
    detection: np.ndarray
    missing: int
    confused: int


def assign(similarity: np.ndarray | torch.Tensor) -> Assignment:
    """Optimal one-to-one assignment of D detections to K subjects from their similarities ``[D, K]``.

    The assignment maximises the total similarity over ``min(D, K)`` (detection, subject) pairs, each
    detection and each subject used at most once (``scipy.optimize.linear_sum_assignment``, the Hungarian
    method; a greedy "best pair first" choice can use up the detection another subject needed). Subjects
    left over (D < K) are *missing* and score 0. A subject is *confused* when it is the best-matching
    reference (row-wise argmax, ties to the first subject) of two or more detections: that subject was
    drawn twice, or another subject was drawn in its likeness. ``confused`` counts such subjects (a subject
    drawn three times counts once).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"assign: expected a [D, K] similarity matrix, got shape {sim.shape}")
    d, k = sim.shape
    scores = np.zeros(k, dtype=np.float64)
    detection = np.full(k, -1, dtype=np.int64)
    if d and k:
        rows, cols = linear_sum_assignment(sim, maximize=True)
        scores[cols], detection[cols] = sim[rows, cols], rows
    best = np.bincount(sim.argmax(axis=1), minlength=k) if d and k else np.zeros(k, dtype=np.int64)
    return Assignment(scores, detection, int((detection < 0).sum()), int((best >= 2).sum()))


@register("dino_seg")
class DinoSegReward(BatchReward):
    """DINO-Seg: DINOv2 cosine between the segmented subject in each image and in its reference.

    Options:
        dino_path: local DINOv2 directory (``facebook/dinov2-large`` in the paper).
        detector_path: local GroundingDINO directory (e.g. ``IDEA-Research/grounding-dino-base``).
        sam_path: local SAM directory (e.g. ``facebook/sam-vit-huge``).
        device, dtype: where and in what precision all three models run (dtype default float32).
        batch_size: images per forward pass of each model.
        box_threshold, text_threshold: GroundingDINO score thresholds for a detection to count.
        pooling: ``"cls"`` or ``"cls+mean"`` (see the module docstring).
        background: RGB fill outside the mask; ``None`` = the DINOv2 processor's mean colour.
        default_subject: the detection query when no subject is given.
        cache_size: reference embeddings kept (least recently used are dropped).
        nms_iou: boxes overlapping a better one by more than this IoU are the same object (several
            subjects per image, :meth:`score_subjects`).
    """

    name = "dino_seg"

    def __init__(
        self,
        dino_path: str | os.PathLike | None = None,
        detector_path: str | os.PathLike | None = None,
        sam_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 8,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        pooling: str = "cls",
        background: Sequence[int] | None = None,
        default_subject: str = "object",
        cache_size: int = 4096,
        nms_iou: float = 0.5,
    ) -> None:
        from transformers import (
            AutoImageProcessor,
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
            Dinov2Model,
            SamModel,
        )

        if pooling not in ("cls", "cls+mean"):
            raise ValueError(f"dino_seg: pooling must be 'cls' or 'cls+mean', got '{pooling}'")
        dino_dir = require_dir(dino_path, "dino_seg", "dino_path", "DINOv2 (e.g. facebook/dinov2-large)")
        detector_dir = require_dir(detector_path, "dino_seg", "detector_path", "GroundingDINO")
        sam_dir = require_dir(sam_path, "dino_seg", "sam_path", "SAM (e.g. facebook/sam-vit-huge)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.pooling = pooling
        self.default_subject = default_subject
        self.nms_iou = nms_iou
        self._last_assignment: list[dict[str, object]] = []

        self.detector_processor = AutoProcessor.from_pretrained(detector_dir)
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(detector_dir, dtype=self.dtype)
        self.sam_processor = AutoProcessor.from_pretrained(sam_dir)
        self.sam = SamModel.from_pretrained(sam_dir, dtype=self.dtype)
        self.dino_processor = AutoImageProcessor.from_pretrained(dino_dir)
        self.dino = Dinov2Model.from_pretrained(dino_dir, dtype=self.dtype)
        for model in (self.detector, self.sam, self.dino):
            model.to(self.device).eval().requires_grad_(False)

        if background is None:
            mean = getattr(self.dino_processor, "image_mean", None) or [0.5, 0.5, 0.5]
            background = [round(255 * float(m)) for m in mean]
        self.background = tuple(int(v) for v in background)
        self.cache = LRUCache(cache_size)
        self.stats: dict[str, int] = {"images": 0, "fallbacks": 0, "empty_masks": 0, "cache_hits": 0}

    # -- the three stages, each batched ------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], queries: Sequence[str]) -> list[list[float] | None]:
        """Best box ``[x0, y0, x1, y1]`` in pixels per image; ``None`` when nothing passes the thresholds."""
        boxes: list[list[float] | None] = []
        for image, (found, scores) in zip(images, self._grounded(images, queries), strict=True):
            box = None
            if len(scores) > 0:
                box = clip_box(found[int(scores.argmax())].tolist(), image)
            boxes.append(box)
        return boxes

    @torch.no_grad()
    def detect_all(
        self, images: Sequence[Image.Image], queries: Sequence[str], limit: int, nms_iou: float = 0.5
    ) -> list[list[tuple[Box, float]]]:
        """Up to ``limit`` (box, score) pairs per image, best first, after non-maximum suppression at
        ``nms_iou``; boxes under a pixel wide after clipping are dropped. For ``limit=1`` the box is the one
        :meth:`detect` returns."""
        out: list[list[tuple[Box, float]]] = []
        for image, (found, scores) in zip(images, self._grounded(images, queries), strict=True):
            array, values = found.numpy(), scores.numpy()
            kept = non_max_suppression(array, values, nms_iou)[:limit] if len(values) else []
            pairs = [(clip_box(array[i].tolist(), image), float(values[i])) for i in kept]
            out.append([(box, score) for box, score in pairs if box is not None])
        return out

    def _grounded(
        self, images: Sequence[Image.Image], queries: Sequence[str]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """GroundingDINO's boxes ``[M, 4]`` (pixels) and scores ``[M]`` above the thresholds, per image."""
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        for chunk in batches(len(images), self.batch_size):
            batch_images = list(images[chunk])
            inputs = self.detector_processor(
                images=batch_images, text=list(queries[chunk]), return_tensors="pt", padding=True
            )
            outputs = self.detector(**to_model(inputs, self.device, self.dtype))
            outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
            results = self.detector_processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"].to(self.device),
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[(image.height, image.width) for image in batch_images],
            )
            found.extend((r["boxes"].float().cpu(), r["scores"].float().cpu()) for r in results)
        return found

    @torch.no_grad()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        """SAM masks (bool ``[H, W]``) for one box prompt per image."""
        masks: list[np.ndarray] = []
        for chunk in batches(len(images), self.batch_size):
            batch_images = list(images[chunk])
            inputs = self.sam_processor(
                images=batch_images, input_boxes=[[list(box)] for box in boxes[chunk]], return_tensors="pt"
            )
            outputs = self.sam(
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                multimask_output=False,
            )
            upscaled = self.sam_processor.post_process_masks(
                outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
            masks.extend(m[0, 0].numpy().astype(bool) for m in upscaled)  # [1 box, 1 mask, H, W]
        return masks

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DINOv2 embeddings, unit-norm, ``[N, D]`` (``[N, 2D]`` for ``cls+mean``), float32 on the CPU."""
        width = self.dino.config.hidden_size * (2 if self.pooling == "cls+mean" else 1)
        out = [torch.zeros(0, width)]
        for chunk in batches(len(images), self.batch_size):
            inputs = self.dino_processor(images=list(images[chunk]), return_tensors="pt")
            output = self.dino(pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
            features = output.pooler_output  # CLS after the final LayerNorm
            if self.pooling == "cls+mean":
                features = torch.cat([features, output.last_hidden_state[:, 1:].mean(dim=1)], dim=-1)
            out.append(features.float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def crops(self, images: Sequence[Image.Image], subjects: Sequence[str | None]) -> list[Image.Image]:
        """Detect, segment, mask and crop: the images DINOv2 sees (useful to inspect the reward)."""
        queries = [detection_query(s, self.default_subject) for s in subjects]
        boxes = self.detect(images, queries)
        self.stats["images"] += len(images)
        self.stats["fallbacks"] += sum(box is None for box in boxes)
        return self._masked_crops(images, boxes)

    def _masked_crops(self, images: Sequence[Image.Image], boxes: Sequence[Box | None]) -> list[Image.Image]:
        """SAM-segment each image inside its box and crop it (``None``: the whole image, unmasked)."""
        found = [i for i, box in enumerate(boxes) if box is not None]
        masks: list[np.ndarray | None] = [None] * len(images)
        if found:
            for i, mask in zip(
                found, self.segment([images[i] for i in found], [boxes[i] for i in found]), strict=True
            ):
                if not mask.any():
                    self.stats["empty_masks"] += 1
                    mask = box_mask(boxes[i], images[i].height, images[i].width)
                masks[i] = mask
        return [
            mask_and_crop(image, mask, self.background) for image, mask in zip(images, masks, strict=True)
        ]

    def _reference_embeddings(
        self, references: list[Image.Image], subjects: list[str | None]
    ) -> torch.Tensor:
        """Unit-norm ``[N, D]`` reference embeddings, each distinct (image, subject) computed at most once."""
        keys = [image_hash(ref, subject or "") for ref, subject in zip(references, subjects, strict=True)]
        known: dict[str, torch.Tensor] = {}
        missing: dict[str, int] = {}  # key -> first index in the batch
        for i, key in enumerate(keys):
            if key in known or key in missing:
                continue
            cached = self.cache.get(key)
            if cached is None:
                missing[key] = i
            else:
                known[key] = cached
        if missing:
            todo = list(missing.values())
            embeddings = self.embed(self.crops([references[i] for i in todo], [subjects[i] for i in todo]))
            for key, embedding in zip(missing, embeddings, strict=True):
                known[key] = embedding
                self.cache.put(key, embedding)
        self.stats["cache_hits"] += len(keys) - len(missing)
        return torch.stack([known[key] for key in keys])

    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        subjects = batch.subjects if batch.subjects is not None else [None] * len(batch.prompts)
        generated = self.embed(self.crops(to_pil(batch.images), subjects))
        reference = self._reference_embeddings(to_pil(batch.references), subjects)
        return (generated * reference).sum(-1)

    @torch.no_grad()
    def score_subjects(
        self,
        images: ImageBatch,
        references: Sequence[ImageBatch],
        prompts: Sequence[str],
        subject_classes: Sequence[Sequence[str] | None] | None = None,
    ) -> torch.Tensor:
        """``[N, K]``: each of the K subjects of every image scored on its own detection (module docstring).

        ``references``: K batches, the k-th subject's reference of every image; ``subject_classes``: K lists
        of N class names (a ``None`` list: the default subject). Diagnostics: :meth:`last_assignment`.
        """
        k, n = len(references), len(images)
        classes = check_subject_batches(images, references, prompts, subject_classes)
        self._last_assignment = []
        if n == 0:
            return torch.zeros(0, k)
        per_subject = [list(c) if c is not None else [None] * n for c in classes]
        refs = torch.stack(  # [K, N, D]
            [self._reference_embeddings(to_pil(references[j]), per_subject[j]) for j in range(k)]
        )
        pil = to_pil(images)

        # One detection query per distinct class of an image, each good for up to K boxes.
        jobs = [
            (i, query)
            for i in range(n)
            for query in dict.fromkeys(
                detection_query(per_subject[j][i], self.default_subject) for j in range(k)
            )
        ]
        found = self.detect_all([pil[i] for i, _ in jobs], [q for _, q in jobs], k, self.nms_iou)
        detected: list[list[tuple[Box, float]]] = [[] for _ in range(n)]
        for (i, _), detections in zip(jobs, found, strict=True):
            detected[i].extend(detections)
        candidates = [self._distinct_boxes(pairs) for pairs in detected]
        self.stats["images"] += n
        self.stats["fallbacks"] += sum(c == [None] for c in candidates)

        owners = [i for i in range(n) for _ in candidates[i]]
        crops = self._masked_crops([pil[i] for i in owners], [box for c in candidates for box in c])
        embedded = self.embed(crops)  # [sum D_i, D]
        scores = torch.zeros(n, k)
        start = 0
        for i in range(n):
            count = len(candidates[i])
            similarity = (embedded[start : start + count, None, :] * refs[None, :, i, :]).sum(-1)  # [D_i, K]
            start += count
            result = assign(similarity)
            scores[i] = torch.from_numpy(result.scores).float()
            self._last_assignment.append(
                {
                    "missing": result.missing,
                    "confused": result.confused,
                    "detections": 0 if candidates[i] == [None] else count,
                    "fallback": candidates[i] == [None],
                    "detection": result.detection.tolist(),
                }
            )
        return scores

    def _distinct_boxes(self, pairs: list[tuple[Box, float]]) -> list[Box | None]:
        """One box per object (the same object found by two queries is one detection), best first; nothing
        detected: ``[None]``, the whole image as the one candidate, as in the single-subject reward."""
        if not pairs:
            return [None]
        boxes, scores = np.asarray([b for b, _ in pairs]), np.asarray([c for _, c in pairs])
        return [pairs[j][0] for j in non_max_suppression(boxes, scores, self.nms_iou)]

    def last_assignment(self) -> list[dict[str, object]]:
        """Per image of the last :meth:`score_subjects` call: ``missing`` and ``confused`` subject counts
        (see :func:`assign`), ``detections`` found, ``fallback`` (nothing found: the whole image was the one
        candidate) and ``detection`` (each subject's candidate index, -1 when missing)."""
        return [dict(d) for d in self._last_assignment]
