"""A vision-language model as judge, behind an OpenAI-compatible chat endpoint (a vLLM server, an API).

The paper (Appendix C.1, Tables 6-7) compares Gemini-2.5-Pro, GPT-4o and Qwen-VL-Max as judges of identity
preservation and prompt following. This reward asks such a model, for each sample, to look at the reference
image (image 1) and the generated image (image 2) and answer with JSON scores from 0 to 10:

    {"identity": <0-10>, "prompt": <0-10>}

``identity``: is the subject in image 2 the same individual as in image 1 (shape, colours, textures, markings,
small details), ignoring pose, background and style changes the prompt asks for. ``prompt``: does image 2
follow the text prompt (content, setting, style, attributes) and look good. The full prompt is
:data:`SYSTEM_PROMPT` + :func:`user_prompt`; with ``criterion="identity"`` or ``"prompt"`` only that score is
requested. Images travel as base64 PNG data URLs in ``image_url`` content parts; ``temperature=0``.

The reward is the requested score divided by 10, in [0, 1] (``"both"``: the mean of the two).
``reward.last_scores`` keeps the last non-empty batch's per-criterion scores (``[N]`` tensors, same scale).

Robustness: every request has a ``timeout``; timeouts, connection errors, HTTP 408/409/429 and 5xx are
retried up to ``max_retries`` times with exponential backoff (``backoff * 2**attempt``, capped at
``backoff_max``; at least the server's ``Retry-After``, within the same cap); once retries are spent,
or on any other HTTP error (e.g. 401, 404: retrying cannot help), :class:`RewardServerError` is raised with
the URL, status and attempts. An answer that arrives but cannot be parsed into the requested scores (no JSON,
missing key, non-numeric or out-of-range value) gives NaN for that sample and is counted in
``reward.stats["malformed"]`` -- the trainer masks non-finite rewards. ``stats`` also counts ``requests`` and
``retries``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from cgrpo.rewards.base import BatchReward, RewardBatch, register, to_pil

CRITERIA = ("identity", "prompt")
RETRYABLE_STATUS = frozenset({408, 409, 429})

SYSTEM_PROMPT = (
    "You are a meticulous evaluator of subject-driven image generation. You are shown a reference image of "
    "a subject (Image 1) and an image generated from a text prompt that should show the same subject "
    "(Image 2). Answer only with a JSON object, without any other text."
)

_CRITERION_TEXT = {
    "identity": (
        '"identity": how faithfully Image 2 preserves the identity of the subject in Image 1 -- the same '
        "individual object or animal, with the same shape, proportions, colours, textures, markings, logos "
        "and small details. Ignore changes of pose, viewpoint, background, lighting or style that the prompt "
        "asks for. 0 = a different subject or no subject, 10 = indistinguishable from the reference subject."
    ),
    "prompt": (
        '"prompt": how well Image 2 follows the text prompt -- the requested content, setting, action, style '
        "and attributes are all present and nothing contradicts them -- and how good it looks overall "
        "(clarity, plausibility, aesthetics). 0 = ignores the prompt, 10 = follows it perfectly with "
        "excellent quality."
    ),
}


class RewardServerError(RuntimeError):
    """The reward server could not be reached or kept failing after all retries."""


def user_prompt(prompt: str, criteria: Sequence[str]) -> str:
    """The text sent with the two images, asking for JSON scores for ``criteria``."""
    lines = [f'Text prompt: "{prompt}"', "", "Rate Image 2 from 0 to 10 (numbers, decimals allowed) on:"]
    lines += [f"- {_CRITERION_TEXT[c]}" for c in criteria]
    example = ", ".join(f'"{c}": <0-10>' for c in criteria)
    lines += ["", f"Reply with exactly one JSON object: {{{example}}}"]
    return "\n".join(lines)


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_scores(text: str, criteria: Sequence[str]) -> dict[str, float] | None:
    """The scores in a model's answer, or ``None`` when it holds no usable JSON object.

    Accepts code fences, prose around the object, keys in any case, and numbers given as strings
    (``"7"``, ``"7/10"``). Every requested criterion must be present, finite and within [0, 10].
    """
    if not isinstance(text, str):
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start in (i for i, ch in enumerate(candidate) if ch == "{"):
            try:
                obj, _ = decoder.raw_decode(candidate[start:])
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            lowered = {str(k).strip().lower(): v for k, v in obj.items()}
            scores = {c: _number(lowered.get(c)) for c in criteria}
            if all(v is not None for v in scores.values()):
                return scores
    return None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", value)
        value = float(match.group(1)) if match else None
    if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 10:
        return None
    return float(value)


@register("vlm_judge")
class VLMJudgeReward(BatchReward):
    """A VLM behind an OpenAI-compatible chat endpoint scores identity and/or prompt following (0-10, /10).

    Options:
        base_url: the API root, e.g. ``"http://localhost:8000/v1"`` (``/chat/completions`` is appended).
        model: the served model name.
        api_key: bearer token; default from the environment variable named by ``api_key_env``
            (``OPENAI_API_KEY``); none is sent when neither is set (a local vLLM server needs none).
        criterion: ``"identity"``, ``"prompt"`` or ``"both"`` (mean of the two).
        timeout: seconds per request (connect, read and write).
        max_retries: retries after the first attempt; backoff, backoff_max: seconds (exponential).
        concurrency: requests in flight at once.
        max_tokens: the answer's token budget; extra_body: extra request fields (e.g. vLLM sampling options).
    """

    name = "vlm_judge"

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        criterion: str = "both",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        concurrency: int = 8,
        max_tokens: int = 256,
        extra_body: dict | None = None,
    ) -> None:
        try:
            import httpx
        except ModuleNotFoundError as error:  # a dev extra today; the judge is optional
            raise ImportError("vlm_judge needs httpx: pip install httpx") from error

        if criterion not in ("identity", "prompt", "both"):
            raise ValueError(
                f"vlm_judge: criterion must be 'identity', 'prompt' or 'both', got '{criterion}'"
            )
        if max_retries < 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("vlm_judge: max_retries must be >= 0, timeout > 0 and concurrency >= 1")
        self.criteria = CRITERIA if criterion == "both" else (criterion,)
        self.criterion = criterion
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff, backoff_max
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "malformed": 0}
        self._stats_lock = threading.Lock()  # requests run in a thread pool
        self.last_scores: dict[str, torch.Tensor] = {}

    def request_body(self, image: Image.Image, reference: Image.Image, prompt: str) -> dict:
        """The chat-completions request for one sample."""
        content = [
            {"type": "text", "text": "Image 1 (reference subject):"},
            {"type": "image_url", "image_url": {"url": png_data_url(reference)}},
            {"type": "text", "text": "Image 2 (generated):"},
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": user_prompt(prompt, self.criteria)},
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        body.update(self.extra_body)
        return body

    def _post(self, body: dict) -> dict | None:
        """POST with retries -> the decoded JSON response; ``None`` when a 200 answer is not JSON."""
        import httpx

        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            if attempt:
                self._count("retries")
            wait = min(self.backoff * 2**attempt, self.backoff_max)
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException as error:
                last_error = f"timed out ({type(error).__name__})"
            except httpx.TransportError as error:
                last_error = f"connection failed ({type(error).__name__}: {error})"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        return None
                last_error = f"HTTP {response.status_code}: {response.text[:200]!r}"
                if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                    raise RewardServerError(f"vlm_judge: {self.url} answered {last_error}; not retrying")
                retry_after = _retry_after(response)
                if retry_after is not None:  # wait at least what the server asks, within the cap
                    wait = min(max(wait, retry_after), self.backoff_max)
            if attempt < self.max_retries:
                time.sleep(wait)
        raise RewardServerError(
            f"vlm_judge: {self.url} failed after {self.max_retries + 1} attempts; last error: {last_error}"
        )

    def judge(self, image: Image.Image, reference: Image.Image, prompt: str) -> dict[str, float] | None:
        """Scores 0-10 for one sample, ``None`` when the answer is malformed; raises RewardServerError."""
        response = self._post(self.request_body(image, reference, prompt))
        try:
            text = response["choices"][0]["message"]["content"]
        except (TypeError, KeyError, IndexError):
            return None
        if isinstance(text, list):  # some servers return content parts
            text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
        return parse_scores(text, self.criteria)

    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        n = len(batch.prompts)
        pil_images, pil_references = to_pil(batch.images), to_pil(batch.references)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="vlm-judge")
        futures = [
            pool.submit(self.judge, image, reference, prompt)
            for image, reference, prompt in zip(pil_images, pil_references, batch.prompts, strict=True)
        ]
        try:
            answers = [future.result() for future in futures]
        except BaseException:
            # Fail fast: queued requests are dropped, running ones finish in the background.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        scores = {c: torch.full((n,), math.nan) for c in self.criteria}
        for i, answer in enumerate(answers):
            if answer is None:
                self._count("malformed")
                continue
            for c in self.criteria:
                scores[c][i] = answer[c] / 10.0
        self.last_scores = scores
        return torch.stack([scores[c] for c in self.criteria]).mean(0)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def close(self) -> None:
        self._client.close()


def _retry_after(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
