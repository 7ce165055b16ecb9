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
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cgrpo.rewards._hf import (
    LRUCache,
    batches,
    image_hash,
    require_dir,
    resolve_device,
    resolve_dtype,
    to_model,
)
from cgrpo.rewards.base import BatchReward, RewardBatch, register, to_pil


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


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """A bool ``[H, W]`` mask that is True inside the pixel box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


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
            for image, result in zip(batch_images, results, strict=True):
                box = None
                if len(result["scores"]) > 0:
                    x0, y0, x1, y1 = result["boxes"][int(result["scores"].argmax())].tolist()
                    x0, x1 = max(0.0, x0), min(float(image.width), x1)
                    y0, y1 = max(0.0, y0), min(float(image.height), y1)
                    if x1 - x0 >= 1 and y1 - y0 >= 1:  # a box under a pixel wide is no detection
                        box = [x0, y0, x1, y1]
                boxes.append(box)
        return boxes

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
        self.stats["images"] += len(images)
        self.stats["fallbacks"] += len(images) - len(found)
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
