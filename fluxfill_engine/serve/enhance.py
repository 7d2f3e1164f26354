"""The prompt enhancer (``fluxfill serve --prompt-enhancer DIR``): a local causal language model that
rewrites a short prompt into a detailed one, for requests with ``enhance_prompt``.

The folder is a transformers text-generation model with its tokenizer (``config.json``, the weights,
the tokenizer files), loaded with ``local_files_only`` and never with remote code. Decoding is greedy,
so a prompt always gets the same rewrite. The answer is cleaned (the instruction, labels such as
``Prompt:``, quotes, a model's ``<think>`` block and anything after the first paragraph are dropped)
and truncated; an empty answer gives back the original prompt.

torch and transformers are imported when a model is loaded, not when this module is imported.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from pathlib import Path
from typing import Any, cast

FLAG = "--prompt-enhancer"

#: The instruction the model gets. A tokenizer with a chat template gets it as the system message and
#: the prompt as the user message; one without gets :data:`PLAIN_TEMPLATE`.
INSTRUCTION = (
    "Rewrite the short image prompt into one detailed prompt for an image inpainting model. Keep the "
    "subject and every detail the prompt gives; add concrete visual details (materials, colors, "
    "lighting, style, composition). Answer with the rewritten prompt only: one paragraph, no quotes, "
    "no explanations."
)
PLAIN_TEMPLATE = INSTRUCTION + "\n\nPrompt: {prompt}\nDetailed prompt:"

DEFAULT_MAX_NEW_TOKENS = 77
#: The longest rewrite returned, in characters (cut at a word boundary). FLUX reads 512 T5 tokens
#: (about 2,000 characters); a rewrite of 77 new tokens is a few hundred.
DEFAULT_MAX_CHARS = 1000
#: The longest prompt given to the model, in characters; a longer one is returned unchanged.
MAX_INPUT_CHARS = 2000

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(
    r"^\s*(?:(?:the|an?|my)\s+)?(?:(?:detailed|enhanced|improved|rewritten|refined|expanded|new|final)\s+)?"
    r"(?:image\s+)?prompt\s*:\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}

logger = logging.getLogger(__name__)


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def _echoes(paragraph: str, instruction: str) -> bool:
    return len(paragraph) >= 20 and (
        instruction.startswith(paragraph[:80]) or paragraph.startswith(instruction)
    )


def clean_output(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """A model's answer -> the rewritten prompt: no ``<think>`` block, no echoed instruction or label
    (``Detailed prompt:``), the first paragraph only, stopped at a line that starts another ``Prompt:``,
    without surrounding quotes, whitespace collapsed, at most ``max_chars`` characters (cut at a word
    boundary). May be empty."""
    text = _THINK.sub("", text)
    instruction = _normalize(INSTRUCTION)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    # An echoed instruction (or the start of it) is not the answer.
    paragraphs = [p for p in paragraphs if not _echoes(_normalize(p), instruction)]
    if not paragraphs:
        return ""
    lines = [line for line in paragraphs[0].splitlines() if line.strip()]
    if lines:
        lines[0] = _LABEL.sub("", lines[0], count=1)
        for i in range(1, len(lines)):
            if _LABEL.match(lines[i]):  # the model goes on with another "Prompt: ..." round
                lines = lines[:i]
                break
    text = " ".join(" ".join(lines).split())
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:-")
    return text


def _check_folder(path: str | Path | None) -> Path:
    if path is None or str(path).strip() == "":
        raise ValueError(f"{FLAG}: give the folder of a local text-generation model")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{FLAG}: no such folder: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{FLAG}: {folder} is not a folder (give the folder of a text-generation model)")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{FLAG}: {folder} has no config.json: expected a transformers causal language model folder "
            "(config.json, the weights, the tokenizer files)"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{FLAG}: {folder} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); save the "
            "tokenizer with the model"
        )
    return folder


def _check_lengths(max_new_tokens: int, max_chars: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{FLAG}: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"{FLAG}: max_chars must be an integer >= 1, got {max_chars!r}")


def _default_dtype(device: Any) -> Any:
    import torch

    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class PromptEnhancer:
    """A local causal LM that rewrites short prompts (greedy, so deterministic). Thread-safe: one
    rewrite at a time (a lock), as the server calls it from its worker thread.

    Build one with :meth:`from_folder`; :meth:`enhance` rewrites a prompt.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_chars: int = DEFAULT_MAX_CHARS,
        path: str | Path | None = None,
    ) -> None:
        _check_lengths(max_new_tokens, max_chars)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_chars = max_chars
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._eos_ids = self._stop_ids()
        if getattr(model, "generation_config", None) is not None:
            model.generation_config = self._greedy(model.generation_config)

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        device: Any = "cpu",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        *,
        dtype: Any = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> PromptEnhancer:
        """Load the model and tokenizer saved in ``path`` (local files only, no remote code) onto
        ``device``. ``dtype``: float32 on a CPU, bfloat16 (or float16) on a GPU unless given.

        Raises FileNotFoundError (no such folder) or ValueError (not a usable model folder), both
        naming ``--prompt-enhancer``."""
        folder = _check_folder(path)
        _check_lengths(max_new_tokens, max_chars)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

        device = torch.device(device)
        dtype = _default_dtype(device) if dtype is None else dtype
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            # With output_loading_info, from_pretrained returns (model, info); transformers types it as
            # returning the model alone.
            model, info = cast(
                "tuple[PreTrainedModel, dict[str, list[str]]]",
                AutoModelForCausalLM.from_pretrained(
                    folder,
                    local_files_only=True,
                    trust_remote_code=False,
                    output_loading_info=True,
                    **{_dtype_kwarg(): dtype},
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{FLAG}: cannot load a text-generation model from {folder}: {error}") from error
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            logger.warning(
                "%s: %s lacks %d weights (randomly initialized): %s", FLAG, folder, len(missing), missing[:5]
            )
        model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, max_new_tokens=max_new_tokens, max_chars=max_chars, path=folder)

    @property
    def device(self) -> Any:
        return self.model.device

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), getattr(self.model, "config", None)):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _greedy(self, source: Any) -> Any:
        """``source`` (the model's generation config) made greedy, so a prompt always gets the same
        rewrite: the sampling settings an instruct model ships (``do_sample``, ``temperature``, ...) are
        set to their neutral values, not merely cleared (transformers 5 fills cleared ones from the
        model's config again) so generate() neither samples nor warns about them; the lengths are set
        per call. Other settings (``repetition_penalty``, the EOS tokens) are kept."""
        config = copy.deepcopy(source)
        neutral = {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
            "typical_p": 1.0,
            "min_p": None,
            "top_h": None,
            "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0,
            "early_stopping": False,
            "length_penalty": 1.0,
            "max_length": None,
            "max_new_tokens": None,
            "min_length": 0,
            "min_new_tokens": None,
        }
        for name, value in neutral.items():
            setattr(config, name, value)
        if config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else min(self._eos_ids, default=0)
        return config

    def render(self, prompt: str) -> str:
        """The text the model continues: the tokenizer's chat template (the instruction as the system
        message, the prompt as the user's) when it has one, else :data:`PLAIN_TEMPLATE`."""
        if getattr(self.tokenizer, "chat_template", None):
            conversations = (
                [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": prompt}],
                # Some templates (Gemma's) refuse a system message.
                [{"role": "user", "content": f"{INSTRUCTION}\n\nPrompt: {prompt}"}],
            )
            for messages in conversations:
                try:
                    return self.tokenizer.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
                    )
                except Exception:  # a template's own error (jinja raise_exception): try the next form
                    continue
        return PLAIN_TEMPLATE.format(prompt=prompt)

    def input_ids(self, prompt: str) -> list[int]:
        """The token ids of :meth:`render` (without an end-of-text token some tokenizers append: the
        model must continue the text, not start a new one)."""
        text = self.render(prompt)
        # A chat template writes its own special tokens (the BOS included).
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        ids = list(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])
        while ids and ids[-1] in self._eos_ids:
            ids.pop()
        return ids

    def _limit(self) -> int | None:
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def enhance(self, prompt: str) -> str:
        """``prompt`` rewritten in more detail; the prompt itself when the model answers nothing
        usable, when ``max_new_tokens`` is 0, or when the prompt is empty or too long for the model."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip() or self.max_new_tokens == 0 or len(prompt) > MAX_INPUT_CHARS:
            return prompt
        import torch

        with self._lock:
            ids = self.input_ids(prompt.strip())
            limit = self._limit()
            if not ids or (limit is not None and len(ids) + self.max_new_tokens > limit):
                logger.warning("%s: the prompt is too long for the model; left as it is", FLAG)
                return prompt
            config = copy.deepcopy(self.model.generation_config)
            config.max_new_tokens = self.max_new_tokens
            inputs = torch.tensor([ids], device=self.model.device)
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config
                )
            new = output[0, len(ids) :].tolist()
            for i, token in enumerate(new):
                if token in self._eos_ids:
                    new = new[:i]
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
        return clean_output(text, self.max_chars) or prompt

    def __repr__(self) -> str:
        return f"PromptEnhancer({str(self.path)!r}, max_new_tokens={self.max_new_tokens})"
