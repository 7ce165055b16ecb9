"""The real reward models, registered by importing their modules (one model family per file).

Every one takes ``device``, ``dtype`` and ``batch_size`` besides the options listed; every model is loaded
from a local directory, nothing is downloaded.

- ``dino_seg`` (:mod:`~cgrpo.rewards.dino_seg`): identity reward for training -- DINOv2 cosine between the
  GroundingDINO+SAM-segmented subject and the reference's. Options ``dino_path``, ``detector_path``,
  ``sam_path``, ``box_threshold``, ``text_threshold``, ``pooling``, ``background``, ``default_subject``,
  ``cache_size``.
- ``hpsv3`` (:mod:`~cgrpo.rewards.hpsv3`): prompt-following/quality reward for training -- HPSv3's predicted
  mean. Options ``base_path``, ``checkpoint``, ``min_pixels``, ``max_pixels``, ``attn_implementation``.
- ``clip_i``, ``clip_t`` (:mod:`~cgrpo.rewards.clip`): CLIP image-image and image-prompt cosines (evaluation,
  Table 7 alternatives). Options ``path`` or ``embedder``.
- ``dino`` (:mod:`~cgrpo.rewards.dino`): DINO ViT-S/16 CLS cosine (evaluation). Option ``path``.

``vlm_judge`` lives in :mod:`cgrpo.rewards.vlm_judge`; background scoring in :mod:`cgrpo.rewards.worker`;
tiny random models of each family for tests in :mod:`cgrpo.testing.rewards`.
"""

from __future__ import annotations

from cgrpo.rewards.clip import CLIPEmbedder, CLIPImageReward, CLIPTextReward
from cgrpo.rewards.dino import DinoEmbedder, DinoReward
from cgrpo.rewards.dino_seg import DinoSegReward
from cgrpo.rewards.hpsv3 import HPSv3Reward

__all__ = [
    "CLIPEmbedder",
    "CLIPImageReward",
    "CLIPTextReward",
    "DinoEmbedder",
    "DinoReward",
    "DinoSegReward",
    "HPSv3Reward",
]
