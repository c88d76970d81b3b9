"""Text to token ids and back, for a Hugging Face model directory or a GGUF file.

The heavy lifting (BPE merges, added-token matching, byte-level decoding) is done by the Rust
`tokenizers` library. This file only assembles a `tokenizers.Tokenizer`, either from the
`tokenizer.json` a Hugging Face directory ships, or from the vocabulary, merges and special token
ids a GGUF file stores as metadata, and adds what an inference engine needs around it: which ids
end a generation, chat templates, and decoding one token at a time.

The reference for the GGUF path is `transformers` loading the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`): ids must be identical. Where transformers
differs from llama.cpp, which defines what a GGUF's `tokenizer.ggml.pre` name means, and from the
tokenizer the model was trained with, we follow those two instead. All such places:

1. `smollm` (and `starcoder`): the original tokenizer splits every digit off before the GPT-2 split.
   transformers does not know the name and silently uses the plain GPT-2 split. Ids only differ
   when whitespace comes right before a number: two or more whitespace characters before a digit
   ("    1" is "ĠĠĠĠ 1" for the model, "ĠĠĠ Ġ 1" in transformers), or a space before a number
   that is not an ASCII digit (" ²" is "Ġ Â²" for the model, "ĠÂ ²" in transformers).
2. Llama 3 (`llama-bpe`, `llama3`, `llama-v3`): like Llama 3's own tokenizer.json and llama.cpp, a
   piece that is whole in the vocabulary is taken as is (`ignore_merges`), and a BOS is added when
   the file does not say `tokenizer.ggml.add_bos_token`. transformers does neither.
3. A control token whose text is not spelled in the byte-level alphabet (DeepSeek's
   `<｜end▁of▁sentence｜>`) is kept as a special token under its own id. transformers drops it,
   so the text is cut into pieces instead.
4. An unknown `tokenizer.ggml.pre` is an error here; transformers falls back to the GPT-2 split.

Where transformers and llama.cpp agree, we agree with them even against the original tokenizer:
Qwen2's tokenizer.json applies NFC normalization first, neither GGUF loader does, so neither do we.
And for `default` (also what a file without the key gets) we take transformers' GPT-2 split over
llama.cpp's, a catch-all mix of four regexes that no model was trained with.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

# Tokens that close a turn or a document in the chat formats we know of. Models often name only
# one of them as EOS (Qwen2.5 Instruct: <|im_end|>), yet emit the other (<|endoftext|>) too.
END_OF_GENERATION_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|eom_id|>")

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
CONTROL = 3
USER_DEFINED = 4

# The Qwen2 and Llama 3 splits, as llama.cpp and transformers spell them. They differ only in how
# many digits go together: one for Qwen2, up to three for Llama 3.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gpt2_split():
    # ByteLevel's own regex is GPT-2's: 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def digits_then_gpt2_split():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split()])


def regex_split(pattern: str):
    # The regex has already cut the text into words, so ByteLevel only maps bytes to its alphabet.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# `tokenizer.ggml.pre` -> how to cut text into words before BPE. Files without the key are "default".
PRE_TOKENIZERS = {
    "default": gpt2_split,
    "gpt2": gpt2_split,
    "smollm": digits_then_gpt2_split,
    "starcoder": digits_then_gpt2_split,
    "qwen2": lambda: regex_split(QWEN2_SPLIT),
    "llama-bpe": lambda: regex_split(LLAMA3_SPLIT),
    "llama3": lambda: regex_split(LLAMA3_SPLIT),
    "llama-v3": lambda: regex_split(LLAMA3_SPLIT),
}
LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3"}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special tokens, stop ids and the chat template.

    Build one with `Tokenizer.from_dir` or `Tokenizer.from_gguf`; the constructor takes an already
    assembled backend and the special tokens by their text. `eos_token_id` is the EOS token's id, or
    failing that the first extra stop id; `stop_token_ids` is every id that ends a generation.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_stop_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ):
        extra_stop_token_ids = list(extra_stop_token_ids)
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._user_turn: tuple[str, str] | None = None  # see user_turn
        # A GGUF's token count is what the embedding table is sized by; the backend would count a
        # token stored twice only once.
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)

        stop = {i for i in (self.eos_token_id, *extra_stop_token_ids) if i is not None}
        # Only added tokens count: a plain BPE piece that happens to read "</s>" is ordinary text.
        added = {token.content: i for i, token in backend.get_added_tokens_decoder().items()}
        stop.update(added[t] for t in END_OF_GENERATION_TOKENS if t in added)
        self.stop_token_ids: set[int] = stop
        if self.eos_token_id is None and extra_stop_token_ids:
            self.eos_token_id = extra_stop_token_ids[0]

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` from a Hugging Face model directory.

        Also read when present: `tokenizer_config.json` (bos/eos/pad/unk tokens, `add_bos_token`,
        `add_eos_token`, `chat_template`), `chat_template.jinja` (where transformers 5 saves the
        template; it wins over the config's) and `generation_config.json` (`eos_token_id`, an int or
        a list, all of which become stop ids).
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path}: not a directory")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{tokenizer_file}: missing; a tokenizer directory needs a tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ValueError(f"{tokenizer_file}: not a valid tokenizers file: {_one_line(e)}") from None
        config = _read_json_object(path / "tokenizer_config.json")
        generation = _read_json_object(path / "generation_config.json")

        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            special[name] = token = _token_text(config.get(name), path / "tokenizer_config.json", name)
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{path / 'tokenizer_config.json'}: {name} {token!r} is not in tokenizer.json")

        # Like transformers: tokenizer.json's post-processor decides about BOS/EOS, unless the config
        # states add_bos_token or add_eos_token, which then replace it.
        if "add_bos_token" in config or "add_eos_token" in config:
            add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
                if flag and special[name] is None:
                    raise ValueError(f"{path / 'tokenizer_config.json'}: add_{name} is set but there is no {name}")
            backend.post_processor = _bos_eos_processor(
                backend, special["bos_token"], special["eos_token"], add_bos, add_eos
            )

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _default_template(config.get("chat_template"), path / "tokenizer_config.json")

        stop_ids = _eos_ids(generation.get("eos_token_id"), path / "generation_config.json")
        for i in stop_ids:
            if backend.id_to_token(i) is None:
                raise ValueError(f"{path / 'generation_config.json'}: eos_token_id {i} is not in the vocabulary")
        return cls(backend, **special, chat_template=chat_template, extra_stop_token_ids=stop_ids)

    @classmethod
    def from_bytes(cls, vocab_size: int) -> Tokenizer:
        """A tokenizer that needs no files, for random weights (`--load-format dummy`): ids 0-255 are
        the 256 bytes of the UTF-8 text, so any text encodes, with no BOS, no stop ids and no chat
        template. A model with random weights mostly emits ids above 255; they decode as "<id>"."""
        if vocab_size < 256:
            raise ValueError(f"the byte tokenizer needs a vocabulary of at least 256 ids, the model has {vocab_size}")
        # ByteLevel spells each byte as one printable character; ids past the bytes get a name made of
        # several, which BPE without merges never forms from text.
        vocab = {char: i for i, char in enumerate(_BYTE_ALPHABET)}
        vocab.update((f"<{i}>", i) for i in range(256, vocab_size))
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return cls(backend, vocab_size=vocab_size)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        from nanokv.loading import read_gguf  # cached: the weights loader parses the same file

        return cls.from_gguf_metadata(read_gguf(path).metadata, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "GGUF metadata") -> Tokenizer:
        """`from_gguf` on metadata already read into a dict of plain values (see `nanokv.loading.read_gguf`)."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError(f"{source}: no tokenizer.ggml.model in the metadata")
        if model != "gpt2":
            raise ValueError(
                f"{source}: tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE)"
            )
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{source}: unknown tokenizer.ggml.pre {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")

        tokens = _string_list(metadata, "tokenizer.ggml.tokens", source)
        merges = _string_list(metadata, "tokenizer.ggml.merges", source)
        token_types = metadata.get("tokenizer.ggml.token_type") or []
        if token_types and len(token_types) != len(tokens):
            raise ValueError(
                f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
            )
        ids = {}
        for name in ("bos", "eos", "padding", "unknown", "eot", "eom"):
            ids[name] = token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
            if token_id is not None and not (type(token_id) is int and 0 <= token_id < len(tokens)):
                raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id {token_id!r} is not a token id")

        control = [i for i, t in enumerate(token_types) if t == CONTROL]
        user_defined = [i for i, t in enumerate(token_types) if t == USER_DEFINED]
        # transformers makes the named special tokens special even when the file calls them NORMAL.
        special = sorted({*control, *(ids[n] for n in ("bos", "eos", "padding", "unknown") if ids[n] is not None)})
        # Ordinary tokens are stored in the byte-level alphabet ("Ġthe"); one that is not gets
        # respelled, as transformers does. Added tokens keep their text: they are matched in the raw
        # input and decoded as is, never through the byte mapping.
        keep = set(special) | set(user_defined)
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        vocab = {}
        for i, token in enumerate(tokens):
            vocab[token if i in keep or set(token) <= alphabet else _byte_level_spelling(token)] = i

        pairs = []
        for n, merge in enumerate(merges):
            left, space, right = merge.partition(" ")
            if not (left and space and right):
                raise ValueError(f"{source}: tokenizer.ggml.merges[{n}] {merge!r} is not two tokens")
            pairs.append((left, right))
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRE)
        except Exception as e:
            raise ValueError(f"{source}: merges do not fit the vocabulary: {_one_line(e)}") from None

        backend = BackendTokenizer(bpe)
        backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", pre in LLAMA3_PRE and ids["bos"] is not None))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and ids[name] is None:
                raise ValueError(f"{source}: tokenizer.ggml.add_{name}_token is set but there is no {name}_token_id")
        text = {name: tokens[i] if i is not None else None for name, i in ids.items()}
        backend.post_processor = _bos_eos_processor(backend, text["bos"], text["eos"], add_bos, add_eos)

        chat_template = metadata.get("tokenizer.chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"{source}: tokenizer.chat_template is not a string")
        return cls(
            backend,
            bos_token=text["bos"],
            eos_token=text["eos"],
            pad_token=text["padding"],
            unk_token=text["unknown"],
            chat_template=chat_template,
            extra_stop_token_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None],
            vocab_size=len(tokens),
        )

    # ---- text <-> ids --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (`<|im_start|>`) are matched as
        such; `add_special_tokens` only controls the BOS/EOS the tokenizer adds around the text."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def user_turn(self) -> tuple[str, str]:
        """(head, tail): the template's text before and after a user turn's content (system
        prompt and user header; end of turn and the assistant header), rendered once."""
        if self._user_turn is None:
            marker = "\x00turn\x00"
            head, tail = self.apply_chat_template([{"role": "user", "content": marker}]).split(marker)
            self._user_turn = head, tail
        return self._user_turn

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """Render `messages` with the model's chat template, as transformers' `apply_chat_template(...,
        tokenize=False)` does. `variables` reach the template too (`tools=[...]`, `enable_thinking=False`).

        The result already holds every special token the model expects, BOS included when the
        template writes one, so encode it with `add_special_tokens=False` (or use `encode_chat`):
        adding a BOS on top would double it.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        # Templates test for a missing key, not for None (OpenAI-style `content=None`), so drop those.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "pad_token": self.pad_token, "unk_token": self.unk_token}
        context = {"tools": None, "documents": None, **{k: v for k, v in named.items() if v is not None}}
        context.update(variables)
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {_one_line(e)}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> list[int]:
        """`apply_chat_template`, then `encode(..., add_special_tokens=False)`."""
        text = self.apply_chat_template(messages, add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"stop_token_ids={sorted(self.stop_token_ids)})"
        )


class StreamDecoder:
    """Turns token ids, fed one at a time, into text pieces whose concatenation is the full decode.

    A byte-level token can hold part of a UTF-8 character (an emoji is often 2-4 tokens); decoding
    it alone gives U+FFFD. So ids wait in `pending` until they decode to text that does not end in
    U+FFFD. The ids of the last piece stay as `context` and are decoded along with the new ones,
    because some decoders treat the first token of a string differently (sentencepiece drops its
    leading space); the new piece is what the longer decode adds to the shorter one.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context: list[int] = []
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        """The text `token_id` completes; "" while it is part of an unfinished character."""
        self.pending.append(token_id)
        text = self._decode(self.context + self.pending)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self._decode(self.context)):]
        self.context, self.pending = self.pending, []
        return piece

    def flush(self) -> str:
        """What is still pending, broken characters included, as the full decode would show it."""
        piece = self._decode(self.context + self.pending)[len(self._decode(self.context)):]
        self.context, self.pending = [], []
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _byte_alphabet() -> list[str]:
    """GPT-2's spelling of byte b as one printable character (what ByteLevel maps text to): printable
    Latin-1 bytes stand for themselves, the others take the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


_BYTE_ALPHABET = _byte_alphabet()


# ---- GGUF metadata -----------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _byte_level_spelling(text: str) -> str:
    # ByteLevel without its regex just maps each UTF-8 byte of the text to its alphabet character.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def _string_list(metadata: dict, key: str, source: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{source}: {key} is missing or not a list of strings")
    return value


def _bos_eos_processor(backend: BackendTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool):
    # Pieces given as a list, so a token with a space in it is not split apart by the template parser.
    single = ([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else [])
    special = {t: backend.token_to_id(t) for t in single if t != "$A"}
    return processors.TemplateProcessing(single=single, special_tokens=list(special.items()))


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {_one_line(e)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any, path: Path, name: str) -> str | None:
    # transformers 4 saved special tokens as {"content": "<s>", "lstrip": false, ...}.
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: {name} should be a string, got {value!r}")
    return value


def _default_template(value: Any, path: Path) -> str | None:
    # Older configs may hold several named templates: [{"name": "default", "template": "..."}, ...].
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: chat_template should be a string")
    return value


def _eos_ids(value: Any, path: Path) -> list[int]:
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id should be an int or a list of ints, got {value!r}")
    return ids


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_chat_template(source: str) -> jinja2.Template:
    # Templates come from model files, so they run sandboxed. trim_blocks/lstrip_blocks and the
    # helpers below are what transformers gives them; templates are written against that.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template, line {e.lineno}: {_one_line(e)}") from None
