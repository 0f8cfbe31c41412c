"""Tokenizers behind one small interface: Hugging Face folders and mistral-common files.

``load_tokenizer(path)`` picks the implementation: a mistral-common file
(``tekken*.json`` or ``*.model.v*``), a folder holding one, or a Hugging Face
folder / GGUF file read through ``transformers.AutoTokenizer``. A config may
also name ``mistral-common:<file name>``: a tokenizer file shipped in the
``mistral_common`` package's ``data/`` folder (e.g. ``tekken_240911.json``).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint.files import ModelLoadError
from engine.types import Message, ToolSpec

_IMAGE_PARTS = ("image_url", "image", "input_image")
MISTRAL_COMMON_SCHEME = "mistral-common:"


def text_only_messages(messages: list[Message]) -> list[Message]:
    """``messages`` with OpenAI-style list content flattened to its text (parts joined by newlines);
    ValueError naming the part for an image or any other non-text part (no engine here takes images)."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind in _IMAGE_PARTS:
                raise ValueError(f"{where}: image input is not supported by this engine")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: only text parts are supported, got type {kind!r}")
            texts.append(part["text"])
        out.append({**message, "content": "\n".join(texts)})
    return out


def openai_tool(tool: ToolSpec) -> dict:
    """A tool in OpenAI's function shape, as chat templates and mistral-common take it."""
    try:
        parameters = json.loads(tool.parameters)
    except json.JSONDecodeError as e:
        raise ValueError(f"tools.parameters: {tool.name!r} is not JSON: {e.msg}") from None
    if not isinstance(parameters, dict):
        raise ValueError(f"tools.parameters: {tool.name!r} must be a JSON Schema object")
    function = {"name": tool.name, "description": tool.description, "parameters": parameters}
    return {"type": "function", "function": function}


def hf_tool_messages(messages: list[Message]) -> list[Message]:
    """Tool-call messages as Hugging Face chat templates read them.

    Templates write ``arguments | tojson``, so the arguments' JSON text
    becomes the object; a tool result gets the called function's ``name``,
    looked up by its ``tool_call_id``, for templates that show it.
    """
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") or {}
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments: not JSON") from None
                names[str(call.get("id"))] = str(fn.get("name"))
                calls.append({**call, "function": {**fn, "arguments": args}})
            m = {**m, "tool_calls": calls, "content": m.get("content") or ""}
        elif m.get("role") == "tool" and "name" not in m and str(m.get("tool_call_id")) in names:
            m = {**m, "name": names[str(m.get("tool_call_id"))]}
        out.append(m)
    return out


def template_tool_format(template: str) -> str | None:
    """The tool-call format a chat template teaches: Hermes tags, Mistral's control token, else plain JSON;
    None when the template never looks at tools."""
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    return "mistral" if "[TOOL_CALLS]" in template else "json"


@dataclass(frozen=True)
class VocabBytes:
    """Each token id's bytes, as a grammar engine matches them against a grammar."""

    tokens: list[bytes]  # [vocab_size]; a special token's entry is its name, never matched as text
    special_ids: frozenset[int]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character for each byte, inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # the unprintable bytes take the code points after 255, in order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _piece_bytes(piece: str) -> bytes:
    """A SentencePiece piece's bytes: ``<0xNN>`` is one byte, ``▁`` a space."""
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class Tokenizer(ABC):
    eos_token_id: int | None
    bos_token_id: int | None

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def apply_chat_template(
        self, messages: list[Message], reasoning_effort: str | None = None, tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        """Prompt token ids for a conversation, ready for the assistant's turn, with ``tools`` offered to it.

        ValueError naming ``tools`` when the chat format cannot show tools to the model.
        """

    @property
    @abstractmethod
    def tool_call_format(self) -> str | None:
        """How this model writes tool calls (a ``engine.toolcalls`` format), None when its chat format has no tools."""

    @abstractmethod
    def special_token_id(self, token: str) -> int | None:
        """The id of ``token`` when it is one special/added token, else None."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def vocab_bytes(self) -> VocabBytes:
        """Every token's bytes, for constrained decoding (``engine.structured``)."""

    def marker_ids(self, text: str) -> list[int]:
        """Token ids of a marker string such as ``[THINK]`` (one special token, or plain text)."""
        tid = self.special_token_id(text)
        return [tid] if tid is not None else self.encode(text, add_special_tokens=False)


class HFTokenizer(Tokenizer):
    def __init__(self, path: str, gguf_file: str | None = None):
        from transformers import AutoTokenizer  # slow import: only when a HF tokenizer is used

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self._tok = AutoTokenizer.from_pretrained(path, **kwargs)
        self.eos_token_id = self._tok.eos_token_id
        self.bos_token_id = self._tok.bos_token_id
        self._added = {t.content: i for i, t in self._tok.added_tokens_decoder.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], reasoning_effort: str | None = None, tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise ValueError("messages: this model's tokenizer has no chat template; send a plain prompt")
        messages = text_only_messages(messages)
        uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        if uses_tools and self.tool_call_format is None:
            # the template would drop the tools or the calls without a word: the model could not know them
            raise ValueError("tools: this model's chat template does not render tools or tool calls")
        extra: dict = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
        if tools:
            extra["tools"] = [openai_tool(t) for t in tools]
        out = self._tok.apply_chat_template(
            hf_tool_messages(messages) if uses_tools else messages, add_generation_prompt=True, tokenize=True, **extra
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    @property
    def tool_call_format(self) -> str | None:
        return template_tool_format(getattr(self._tok, "chat_template", None) or "")

    def special_token_id(self, token: str) -> int | None:
        return self._added.get(token)

    def vocab_bytes(self) -> VocabBytes:
        pieces = self._tok.convert_ids_to_tokens(list(range(len(self._tok))))
        decoder = json.dumps(json.loads(self._tok.backend_tokenizer.to_str()).get("decoder"))
        alphabet = _byte_level_alphabet() if "ByteLevel" in decoder else None
        added = self._tok.added_tokens_decoder
        tokens = []
        for i, piece in enumerate(pieces):
            if i in added or alphabet is None:
                tokens.append(piece.encode("utf-8") if i in added else _piece_bytes(piece))
            else:
                tokens.append(bytes(alphabet[c] for c in piece))
        return VocabBytes(tokens, frozenset(i for i, t in added.items() if t.special))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)


class MistralCommonTokenizer(Tokenizer):
    """mistral-common's SentencePiece or Tekken tokenizer and its chat format."""

    def __init__(self, file: str):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._mistral = MistralTokenizer.from_file(file)
        self._tok = self._mistral.instruct_tokenizer.tokenizer
        self.eos_token_id = self._tok.eos_id
        self.bos_token_id = self._tok.bos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, bos=add_special_tokens, eos=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        return self._tok.decode(list(ids), special_token_policy=policy)

    def apply_chat_template(
        self, messages: list[Message], reasoning_effort: str | None = None, tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        # mistral-common's own reading of OpenAI's shape: assistant tool_calls and tool results included
        request = ChatCompletionRequest.from_openai(
            text_only_messages(messages), tools=[openai_tool(t) for t in tools] or None
        )
        return list(self._mistral.encode_chat_completion(request).tokens)

    @property
    def tool_call_format(self) -> str | None:
        return "mistral"

    def special_token_id(self, token: str) -> int | None:
        try:
            tid = self._tok.get_special_token(token)
        except Exception:  # noqa: BLE001 -- mistral-common raises several kinds for an unknown token
            return None
        # SentencePiece answers unknown pieces with the unk id instead of failing.
        return None if tid == getattr(self._tok, "unk_id", None) else tid

    def vocab_bytes(self) -> VocabBytes:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        special = frozenset(self._tok.special_ids)
        if hasattr(self._tok, "id_to_byte_piece"):  # Tekken: byte-level BPE
            keep = SpecialTokenPolicy.KEEP
            tokens = [self._tok.id_to_byte_piece(i, keep) for i in range(self._tok.n_words)]
        else:
            tokens = [_piece_bytes(self._tok.id_to_piece(i)) for i in range(self._tok.n_words)]
        return VocabBytes(tokens, special)

    @property
    def vocab_size(self) -> int:
        return self._tok.n_words


def mistral_tokenizer_file(path: str) -> str | None:
    """The mistral-common tokenizer file at ``path`` (the file itself, or the newest one in a folder), or None."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        return path if name.startswith("tekken") and name.endswith(".json") or ".model" in name else None
    for pattern in ("tekken*.json", "*.model.v*", "tokenizer.model.v*"):
        hits = sorted(glob.glob(os.path.join(path, pattern)))
        if hits:
            return hits[-1]
    return None


def find_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer at ``path`` (a mistral-common file, a HF folder or a .gguf file), or None if it has none."""
    if path.endswith(".gguf") and os.path.isfile(path):
        return HFTokenizer(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return HFTokenizer(path)
    mistral = mistral_tokenizer_file(path)
    return MistralCommonTokenizer(mistral) if mistral else None


def load_tokenizer(path: str) -> Tokenizer:
    """Like ``find_tokenizer``, for a path that must hold a tokenizer: a clear error otherwise."""
    if not os.path.exists(path):
        raise ValueError(f"tokenizer: {path} does not exist")
    tok = find_tokenizer(path)
    if tok is None:
        raise ValueError(
            f"tokenizer: no tokenizer found at {path} (expected tokenizer.json, tekken*.json or *.model.v*)"
        )
    return tok


def model_tokenizer(name: str | None, model_dir: str, vocab_size: int) -> Tokenizer | None:
    """The tokenizer a model runs with: ``name`` (a path or ``mistral-common:<file>``, which must exist) or the
    model folder's own (which tiny test checkpoints may lack).

    A vocabulary larger than the model's is refused here, at load, with both
    sizes: its ids would index past the embedding on the first prompt.
    """
    tokenizer = load_tokenizer(resolve_tokenizer_path(name)) if name else find_tokenizer(model_dir)
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ModelLoadError(
            f"tokenizer: {name or model_dir} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size {vocab_size}; use the tokenizer the model was trained with"
        )
    return tokenizer


def mistral_common_data_dir() -> Path:
    """``mistral_common/data`` located without importing the package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("tokenizer: the mistral-common package is not installed (pip install mistral-common)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def resolve_tokenizer_path(name: str) -> str:
    """A tokenizer path: ``mistral-common:<file>`` resolved to the packaged file, anything else as is."""
    if not name.startswith(MISTRAL_COMMON_SCHEME):
        return name
    file = name[len(MISTRAL_COMMON_SCHEME) :]
    data = mistral_common_data_dir()
    path = data / file
    if not file or "/" in file or "\\" in file or not path.is_file():
        available = (
            sorted(p.name for p in data.iterdir() if p.is_file() and not p.name.startswith("_"))
            if data.is_dir()
            else []
        )
        raise ValueError(
            f"tokenizer: {name!r} is not a mistral-common tokenizer file (available: {', '.join(available) or 'none'})"
        )
    return str(path)
