"""The OpenAI-compatible server (nanokv/serve), driven by the official `openai` client over loopback:
concurrent streams, a client that leaves mid-stream, mixed methods in one run, and bad input.
Outputs are checked against the same model run through LLM.generate (greedy)."""

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from nanokv import LLM, SamplingParams  # noqa: E402
from nanokv.serve.app import build_app  # noqa: E402
from nanokv.serve.engine_loop import EngineLoop  # noqa: E402
from tiny_model import save_tiny_llama  # noqa: E402

MODEL = "tiny"
# a chat template of its own (the tiny model has none), so /v1/chat/completions has something to render
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=3_000_000, max_num_seqs=64)
PROMPTS = [f"request {i}: tell me about the number {i * 7}" for i in range(32)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("serve"))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    """A server on a free loopback port, in a thread; it stops when the module's tests end."""
    llm = LLM(str(model_dir), **ENGINE, enable_prefix_caching=True)  # as python -m nanokv.serve runs it
    loop = EngineLoop(llm)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(loop, MODEL), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", loop
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive() and not loop._thread.is_alive()  # it stopped, engine loop included


def reference(model_dir, prompts, method=None, max_tokens=8, **method_args):
    """Greedy token ids from LLM.generate, the engine without the server."""
    llm = LLM(str(model_dir), **ENGINE, **({"method": method, **method_args} if method else {}))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [o.text for o in llm.generate(prompts, params, chat=False)]


def idle(loop, timeout=20.0):
    """Wait until the engine holds no request and no block."""
    deadline = time.time() + timeout
    while loop.llm.has_unfinished() or loop.llm.cache.pool.num_used:
        assert time.time() < deadline, f"{loop.llm.cache.pool.num_used} blocks still held"
        time.sleep(0.02)


def test_concurrent_streams_batch_and_match_generate(server, model_dir):
    url, loop = server
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)

    async def one(prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        pieces, finish = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    idle(loop)
    loop.llm.tally["peak_running"] = 0
    results = asyncio.run(all_of_them())
    assert [text for text, _ in results] == reference(model_dir, PROMPTS)
    assert all(finish == "length" for _, finish in results)
    assert loop.llm.tally["peak_running"] > 8  # the requests ran batched, not one after another
    idle(loop)


def test_chat_and_usage(server, model_dir):
    url, loop = server
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                           max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 5
    prompt_ids = LLM(str(model_dir), **ENGINE).tokenizer.encode_chat([{"role": "user", "content": "hi there"}])
    assert reply.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_disconnect_mid_stream_frees_blocks(server):
    url, loop = server
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    idle(loop)
    aborted = loop.counters.aborted
    stream = client.completions.create(model=MODEL, prompt="a long story " * 8, max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            break
    assert loop.llm.cache.pool.num_used > 0  # it holds blocks while it runs
    stream.close()  # the client goes away
    idle(loop, timeout=10)
    assert loop.counters.aborted == aborted + 1
    assert loop.llm.cache.pool.num_free == loop.llm.cache.pool.usable_blocks


# each gives other tokens than full on this model; tova evicts during decode and recycled_attention picks the
# pages each step reads, so their decode steps are their own, while the rest decode alike and share steps
MIXED = [None, {"method": "snapkv", "compression": 0.5}, {"method": "streaming_llm", "budget": 24},
         {"method": "pyramidkv", "budget": 16}, {"method": "tova", "budget": 16},
         {"method": "recycled_attention", "budget": 16}]


def test_mixed_methods_in_one_run(server, model_dir):
    """Each request's own method, served together from one pool, gives what that method gives alone."""
    url, loop = server
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    prompts = [f"a prompt long enough to compress, number {i}, " * 4 for i in range(len(MIXED))]

    async def one(prompt, method):
        body = {"ignore_eos": True} | ({"kv_compression": method} if method else {})
        reply = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                extra_body=body)
        return reply.choices[0].text

    async def all_of_them():
        return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, MIXED)))

    idle(loop)
    steps = loop.llm.tally["decode_steps"]
    served = asyncio.run(all_of_them())
    for prompt, method, text in zip(prompts, MIXED, served):
        settings = dict(method or {})
        name = settings.pop("method", None)
        alone = reference(model_dir, [prompt], name, max_tokens=12, **settings)[0]
        assert text == alone, method
        assert method is None or alone != reference(model_dir, [prompt], max_tokens=12)[0]  # the method mattered
    # three groups take turns: 3 x 11 decode steps, not one group per request (6 x 11)
    assert loop.llm.tally["decode_steps"] - steps == 3 * 11
    idle(loop)


def test_bad_input_gets_openai_errors(server):
    url, loop = server
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    cases = [
        (openai.NotFoundError, dict(model="no-such-model", prompt="hi")),
        (openai.BadRequestError, dict(model=MODEL, prompt="hi", extra_body={"kv_compression": {"method": "nope"}})),
        (openai.BadRequestError, dict(model=MODEL, prompt="hi",
                                      extra_body={"kv_compression": {"method": "snapkv", "compression": 1.5}})),
        (openai.BadRequestError, dict(model=MODEL, prompt="hi",
                                      extra_body={"kv_compression": {"method": "kivi"}})),  # needs another pool
        (openai.BadRequestError, dict(model=MODEL, prompt="hi", max_tokens=-1)),
        (openai.BadRequestError, dict(model=MODEL, prompt="hi", n=2)),
        (openai.BadRequestError, dict(model=MODEL, prompt="")),
    ]
    for error, kwargs in cases:
        with pytest.raises(error) as caught:
            client.completions.create(**kwargs)
        body = caught.value.body
        assert body["message"] and body["type"] == "invalid_request_error", kwargs
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=MODEL, prompt="x" * 300)  # the tiny model's context is 256
    assert caught.value.status_code == 413 and caught.value.body["code"] == "context_length_exceeded"
    for data in (b"{not json", b"[1, 2]"):  # what the openai client cannot send: raw bytes
        request = urllib.request.Request(f"{url}/completions", data=data, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request)
        assert caught.value.code == 400 and json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"
    metrics = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    assert 'nanokv_kv_blocks_free{tier="device"}' in metrics and "nanokv_preemptions_total" in metrics
    assert loop.alive  # nothing above broke the engine


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(server, model_dir):
    url, loop = server
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    system = "You are a careful assistant who answers in one short sentence. " * 2   # 8 blocks of 16 bytes
    prompts = [system + f"Question {i}: what is {i} + {i}?" for i in range(3)]
    idle(loop)
    before = loop.llm.tally["prefix_cache_hit_tokens"]
    texts = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert texts == reference(model_dir, prompts, max_tokens=6)  # the same tokens as with no cache
    hits = loop.llm.tally["prefix_cache_hit_tokens"] - before
    assert hits >= 2 * (len(system) // 16 * 16)  # the 2nd and 3rd requests found the system prompt's blocks
    metrics = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    assert "nanokv_prefix_cache_hit_tokens_total" in metrics
