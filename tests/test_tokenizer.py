"""nanokv.tokenizer against transformers, on real GGUF files and on tiny hand-made ones.

The real files come through nanokv.hub (see conftest.real_gguf). Loading a 150k vocabulary takes seconds on either side, so every
tokenizer is loaded once per module.
"""

import json
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from conftest import real_gguf
from nanokv.loading import read_gguf
from nanokv.tokenizer import Tokenizer

SMOLLM = "smollm2-135m"  # llama arch, pre=smollm
QWEN = "qwen2.5-coder-0.5b"  # qwen2 arch, pre=qwen2

TEXTS = [
    "Hello, world!",
    "café naïve résumé Ångström façade São Paulo",
    "decomposed e\u0301 and precomposed é",
    "日本語のテキストと中文字符，还有标点。",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 keycap 1️⃣",
    "def square(x):\n\treturn x ** 2  # comment\n\n\nclass A:\n    pass\n",
    "if (a && b) { return c[i++] >> 2; } // <tag attr=\"v\">",
    "spaces   between\t\ttabs\n\n\nnewlines \r\n crlf   ",
    "    1 indented digit, a\n\n22, x\t\t333 and  4444",
    "digits 1234567890 3.14159 1,000,000 2024-01-31 ٣٤٥ ² ½",
    "I'm sure you'll see we've, they'd, it's, DON'T, Y'ALL'D",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token<|im_end|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "",
    " leading space",
    "trailing space ",
    "Ünïcödé ß ǅ ﬁ ① Ω ≈ ∑ 𝔘𝔫𝔦",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "A haiku about 日本 🌸, please."},
        {"role": "assistant", "content": "Sure.\n\nPetals fall."},
        {"role": "user", "content": "Again, with tabs\tand\n\nnewlines"},
    ],
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, e.g. <Zürich> & \"Paris\"",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def gguf_file(name: str) -> Path:
    return real_gguf(name)


def hf_ids(hf, text, add_special_tokens=True):
    return hf(text, add_special_tokens=add_special_tokens)["input_ids"]


def smollm_splits_differently(text: str) -> bool:
    # See the module docstring of nanokv/tokenizer.py: whitespace right before a number, when it is
    # a run of two or more, or the number is not an ASCII digit (no "Ġ1"-like tokens exist for those).
    regex = pytest.importorskip("regex")
    return regex.search(r"\s\s\p{N}|\s(?![0-9])\p{N}", text) is not None


@pytest.fixture(scope="module")
def transformers_auto():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer


@pytest.fixture(scope="module")
def smollm_metadata():
    return read_gguf(gguf_file(SMOLLM)).metadata


@pytest.fixture(scope="module")
def load(transformers_auto, request):
    """load(name) -> (ours, transformers') tokenizer for one real GGUF file, each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            path = gguf_file(name)
            if name == SMOLLM:  # shared with the tests that relabel SmolLM's metadata
                ours = Tokenizer.from_gguf_metadata(request.getfixturevalue("smollm_metadata"), str(path))
            else:
                ours = Tokenizer.from_gguf(path)
            cache[name] = ours, transformers_auto.from_pretrained(str(path.parent), gguf_file=path.name)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=[SMOLLM, QWEN], ids=["smollm", "qwen2"])
def pair(request, load):
    """(file name, ours, transformers') for each real GGUF file."""
    return request.param, *load(request.param)


# ---- real files against transformers ------------------------------------------------------------


@pytest.mark.slow
def test_encode_matches_transformers(pair):
    name, ours, hf = pair
    compared = 0
    for text in TEXTS:
        if name == SMOLLM and smollm_splits_differently(text):
            continue  # checked against the model's own split in test_smollm_splits_digits_like_the_model
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens) == hf_ids(hf, text, add_special_tokens), text
        compared += 1
    assert compared >= len(TEXTS) - 3  # smollm leaves out three texts


@pytest.mark.slow
def test_smollm_splits_digits_like_the_model(load):
    ours, hf = load(SMOLLM)
    # SmolLM's own tokenizer.json (and llama.cpp for pre=smollm) split digits off before the GPT-2
    # regex. Give transformers' backend that pre-tokenizer and the two agree on every text.
    fixed = BackendTokenizer.from_str(hf.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in TEXTS:
        assert ours.encode(text) == fixed.encode(text).ids, text
    # The case that differs, spelled out: four spaces before a digit.
    assert [ours.backend.id_to_token(i) for i in ours.encode("    1")] == ["ĠĠĠĠ", "1"]
    assert [hf.convert_ids_to_tokens(i) for i in hf_ids(hf, "    1")] == ["ĠĠĠ", "Ġ", "1"]


@pytest.mark.slow
def test_decode_round_trips_and_matches_transformers(pair):
    _, ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


@pytest.mark.slow
def test_special_tokens_match_transformers(pair):
    name, ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # neither file asks for BOS
    im_end, endoftext = ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
    assert ours.stop_token_ids == {im_end, endoftext}
    assert ours.eos_token_id == im_end


@pytest.mark.slow
def test_chat_template_matches_transformers(pair):
    name, ours, hf = pair
    assert ours.has_chat_template
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt) == expected
        expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
        assert ours.encode_chat(messages) == expected_ids
    if name == QWEN:  # its template writes tools out with tojson
        expected = hf.apply_chat_template(
            CONVERSATIONS[0], tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
        )
        rendered = ours.apply_chat_template(CONVERSATIONS[0], tools=[WEATHER_TOOL])
        assert rendered == expected and "<Zürich> &" in rendered


@pytest.mark.slow
def test_stream_decoder_joins_to_full_decode(pair):
    _, ours, _ = pair
    text = "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, 日本語 and 😀👍🏽 done<|im_end|>"
    ids = ours.encode(text)
    for skip in (True, False):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == ours.decode(ids, skip_special_tokens=skip)
        assert "" in pieces  # some emoji took more than one token, and waited for the rest
        assert all("\ufffd" not in piece for piece in pieces)
    # Cut off in the middle of a character: flush shows what the full decode shows.
    cut = ours.encode("ok 😀")[:-1]
    stream = ours.stream_decoder()
    assert "".join(stream.push(i) for i in cut) + stream.flush() == ours.decode(cut)


@pytest.fixture(scope="module")
def saved_dir(pair, tmp_path_factory):
    name, _, hf = pair
    path = tmp_path_factory.mktemp(f"saved-{name[:6]}")
    hf.save_pretrained(str(path))
    return path


@pytest.mark.slow
def test_from_dir_on_save_pretrained(pair, saved_dir):
    _, ours_gguf, hf = pair
    ours = Tokenizer.from_dir(saved_dir)
    for text in TEXTS:
        assert ours.encode(text) == hf_ids(hf, text), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf_ids(hf, text), skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.stop_token_ids == ours_gguf.stop_token_ids
    assert ours.apply_chat_template(CONVERSATIONS[1]) == ours_gguf.apply_chat_template(CONVERSATIONS[1])


@pytest.mark.slow
def test_llama3_split_matches_transformers(smollm_metadata):
    # No Llama 3 file at hand: relabel SmolLM's vocabulary as llama-bpe and compare the splits.
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    metadata = dict(smollm_metadata, **{"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": False})
    ours = Tokenizer.from_gguf_metadata(metadata)
    fields = {"tokenizer_type": "gpt2", "pre_tokenizer_type": "llama-bpe"}
    fields.update({k.removeprefix("tokenizer.ggml."): v for k, v in metadata.items() if "ggml." in k})
    theirs, _ = convert_gguf_tokenizer("llama", fields)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text).ids, text
    assert [w for w, _ in ours.backend.pre_tokenizer.pre_tokenize_str("1234567")] == ["123", "456", "7"]


# ---- tiny hand-made GGUF files ------------------------------------------------------------------

BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", *BYTES, "he", "ll", "hell", "hello", "Ġw"]
TINY_TYPES = [3, 3, 3, 4] + [1] * (len(TINY_TOKENS) - 4)
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def write_gguf(path: Path, metadata: dict) -> Path:
    writer = GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(path: Path, drop=(), **changes) -> Path:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": TINY_TOKENS,
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ w"],
        "tokenizer.ggml.token_type": TINY_TYPES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": TINY_TEMPLATE,
    }
    metadata.update({"tokenizer.ggml." + k: v for k, v in changes.items()})
    return write_gguf(path, {k: v for k, v in metadata.items() if k.removeprefix("tokenizer.ggml.") not in drop})


def test_tiny_gguf_add_bos_matches_transformers(tmp_path, transformers_auto):
    # The Qwen file says add_bos_token=false; this is what transformers does when a file says true.
    path = tiny_gguf(tmp_path / "tiny.gguf", add_bos_token=True)
    ours = Tokenizer.from_gguf(path)
    hf = transformers_auto.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "hello world<think><|im_end|>"
    assert ours.encode(text) == hf_ids(hf, text) == [1, *ours.encode(text, add_special_tokens=False)]
    messages = [{"role": "user", "content": "hello"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected


def test_tiny_gguf_added_tokens(tmp_path):
    ours = Tokenizer.from_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
    ids = ours.encode("hello<think>x<|im_end|>")
    assert ids == [TINY_TOKENS.index(t) for t in ("hello", "<think>", "x", "<|im_end|>")]
    # <think> is user-defined: kept whole but not special, so skip_special_tokens keeps it.
    assert ours.decode(ids) == "hello<think>x"
    assert ours.decode(ids, skip_special_tokens=False) == "hello<think>x<|im_end|>"
    assert ours.stop_token_ids == {0, 2} and ours.vocab_size == len(TINY_TOKENS)


def test_tiny_gguf_control_token_outside_byte_alphabet(tmp_path):
    tokens = TINY_TOKENS + ["<｜end▁of▁sentence｜>"]
    path = tiny_gguf(tmp_path / "t.gguf", tokens=tokens, token_type=TINY_TYPES + [3], eos_token_id=len(tokens) - 1)
    ours = Tokenizer.from_gguf(path)
    assert ours.encode("hello<｜end▁of▁sentence｜>") == [TINY_TOKENS.index("hello"), len(tokens) - 1]
    assert ours.eos_token_id == len(tokens) - 1 and ours.eos_token_id in ours.stop_token_ids
    assert ours.decode([len(tokens) - 1], skip_special_tokens=False) == "<｜end▁of▁sentence｜>"


def test_tiny_gguf_llama3_adds_bos_unless_told_not_to(tmp_path):
    assert Tokenizer.from_gguf(tiny_gguf(tmp_path / "a.gguf", pre="llama-bpe")).encode("hello")[0] == 1
    told = Tokenizer.from_gguf(tiny_gguf(tmp_path / "b.gguf", pre="llama-bpe", add_bos_token=False))
    assert told.encode("hello") == [TINY_TOKENS.index("hello")]


@pytest.mark.parametrize(
    "changes, drop, message",
    [
        ({"model": "llama"}, (), r"'llama'.*supported: 'gpt2'"),
        ({"model": "t5"}, (), r"'t5'"),
        ({}, ("model",), r"no tokenizer\.ggml\.model"),
        ({"pre": "mystery"}, (), r"unknown tokenizer\.ggml\.pre 'mystery'; supported: .*smollm.*qwen2.*llama-bpe"),
        ({}, ("tokens",), r"tokenizer\.ggml\.tokens is missing"),
        ({}, ("merges",), r"tokenizer\.ggml\.merges is missing"),
        ({"token_type": [1, 1]}, (), r"token_type has 2 entries"),
        ({"bos_token_id": 10_000}, (), r"bos_token_id 10000 is not a token id"),
        ({"merges": ["h e", "q zz"]}, (), r"merges do not fit the vocabulary"),
        ({"merges": ["he"]}, (), r"merges\[0\] 'he' is not two tokens"),
        ({"add_eos_token": True}, ("eos_token_id",), r"add_eos_token is set but there is no eos_token_id"),
    ],
)
def test_bad_gguf_metadata(tmp_path, changes, drop, message):
    path = tiny_gguf(tmp_path / "bad.gguf", drop=drop, **changes)
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_gguf(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_bad_gguf_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated.gguf"):
        Tokenizer.from_gguf(truncated)


# ---- tiny hand-made directories -----------------------------------------------------------------


def tiny_dir(path: Path, config=None, generation=None, template=None) -> Path:
    """A byte-level BPE tokenizer.json, plus whichever config files are given."""
    vocab = {token: i for i, token in enumerate(TINY_TOKENS)} | {"<s>": len(TINY_TOKENS), "</s>": len(TINY_TOKENS) + 1}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>")
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    path.mkdir(exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        if content is not None:
            (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    return path


def test_from_dir_reads_configs(tmp_path):
    config = {
        "bos_token": {"content": "<s>", "lstrip": False},  # transformers 4 style
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}],
    }
    ours = Tokenizer.from_dir(tiny_dir(tmp_path / "d", config, generation={"eos_token_id": [2, 0]}))
    s, end = len(TINY_TOKENS), len(TINY_TOKENS) + 1
    assert ours.encode("hello") == [s, TINY_TOKENS.index("hello")]
    assert ours.encode("hello", add_special_tokens=False) == [TINY_TOKENS.index("hello")]
    assert (ours.bos_token_id, ours.eos_token_id) == (s, end)
    assert ours.stop_token_ids == {end, 2, 0}
    text = ours.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<s>hello" and ours.encode_chat([{"role": "user", "content": "hello"}]).count(s) == 1

    # chat_template.jinja wins over the config; generation_config's single int is a stop id too.
    ours = Tokenizer.from_dir(tiny_dir(tmp_path / "e", {"chat_template": "x"}, {"eos_token_id": 2}, template="jinja"))
    assert ours.apply_chat_template([]) == "jinja" and ours.eos_token_id == 2 and ours.stop_token_ids >= {2, 0}
    assert ours.encode("hello") == [TINY_TOKENS.index("hello")]  # no config flag, no post-processor: no BOS


def test_from_dir_without_configs(tmp_path):
    ours = Tokenizer.from_dir(tiny_dir(tmp_path / "d"))
    assert not ours.has_chat_template and ours.bos_token_id is None and ours.eos_token_id is None
    assert ours.stop_token_ids == {0, 2, len(TINY_TOKENS) + 1}  # <|endoftext|>, <|im_end|>, </s>
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_dirs(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path / "empty")
    broken = tiny_dir(tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_dir(broken)
    cases = [
        ("{not json", None, r"tokenizer_config\.json: not valid JSON"),
        ("[1, 2]", None, r"tokenizer_config\.json: expected a JSON object"),
        ({"bos_token": "<nope>"}, None, r"bos_token '<nope>' is not in tokenizer\.json"),
        ({"eos_token": 7}, None, r"eos_token should be a string"),
        (None, {"eos_token_id": "2"}, r"generation_config\.json: eos_token_id should be an int or a list"),
        (None, {"eos_token_id": [10_000]}, r"eos_token_id 10000 is not in the vocabulary"),
        ({"add_bos_token": True}, None, r"add_bos_token is set but there is no bos_token"),
    ]
    for n, (config, generation, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message) as error:
            Tokenizer.from_dir(tiny_dir(tmp_path / f"case{n}", config, generation))
        assert "\n" not in str(error.value)


def test_chat_template_errors(tmp_path):
    raising = "{% if messages[0].role != 'user' %}{{ raise_exception('user goes first') }}{% endif %}ok"
    ours = Tokenizer.from_dir(tiny_dir(tmp_path / "a", template=raising))
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="user goes first"):
        ours.apply_chat_template([{"role": "system", "content": "x"}])
    broken = Tokenizer.from_dir(tiny_dir(tmp_path / "b", template="{% for m in messages %}"))
    with pytest.raises(ValueError, match="chat template"):
        broken.apply_chat_template([])
    # The sandbox keeps templates away from Python internals.
    for n, template in enumerate(["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"]):
        sneaky = Tokenizer.from_dir(tiny_dir(tmp_path / f"c{n}", template=template))
        with pytest.raises(ValueError, match="unsafe"):
            sneaky.apply_chat_template([])
