"""EngineLoop: one LLM stepped by one background thread, fed by many HTTP requests.

The LLM is not thread-safe, so only the loop's thread touches it. Handlers (on the asyncio event
loop) send it commands through an inbox: add a request (the reply is its stream, or the
ValueError that refused it), abort one. Before every step the thread applies what the inbox
holds, so requests that arrive while others run join the next step (continuous batching), and an
aborted request's blocks are back in the pool before the next step runs. Each request's text
pieces go back to its handler through an asyncio queue, one put per token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from nanokv.engine.llm import LLM
from nanokv.engine.sequence import Sequence
from nanokv.sampling import SamplingParams


@dataclass
class Piece:
    """New text of one request, and how it ended once it has (`finish_reason`)."""
    text: str
    finish_reason: str | None = None


@dataclass
class RequestStream:
    """A request as its handler sees it: its Sequence, and the pieces the loop sends."""
    seq: Sequence
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class Counters:
    """What /metrics reports that the engine does not keep itself."""
    started: float = field(default_factory=time.time)
    requests: int = 0            # accepted
    finished: int = 0
    aborted: int = 0
    prompt_tokens: int = 0       # of accepted requests
    generated_tokens: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens) of recent steps

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds."""
        now, tokens = time.time(), 0
        for t, n in reversed(self.recent):
            if now - t > window:
                break
            tokens += n
        return tokens / window


class EngineLoop:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.counters = Counters()
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._thread = threading.Thread(target=self._run, name="nanokv-engine", daemon=True)
        self._stopping = False
        self.error: BaseException | None = None  # what stopped the loop, if anything did

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopping = True
        self._inbox.put(("wake",))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # --- called from the event loop ---------------------------------------------------

    async def add(self, prompt, params: SamplingParams, chat: bool, method) -> RequestStream:
        """Queue a request -> its stream; raises the ValueError that refused it (bad input, too long)."""
        if not self.alive:
            raise RuntimeError(f"the engine loop has stopped: {self.error!r}")
        reply: Future = Future()
        self._inbox.put(("add", prompt, params, chat, method, asyncio.get_running_loop(), reply))
        return await asyncio.wrap_future(reply)

    def abort(self, stream: RequestStream):
        """Drop a request whose client went away; its blocks go back before the next step."""
        self._inbox.put(("abort", stream.seq))

    # --- the loop's thread ------------------------------------------------------------

    def _run(self):
        try:
            while not self._stopping:
                # block while there is nothing to run, so an idle server uses no CPU
                self._apply(self._inbox.get() if not self.llm.has_unfinished() else None)
                if self.llm.has_unfinished():
                    stepped = self.llm.step()
                    self.counters.generated_tokens += len(stepped)
                    self.counters.recent.append((time.time(), len(stepped)))
                    for seq, piece in stepped:
                        self._send(seq, Piece(piece, seq.finish_reason if seq.finished else None))
        except BaseException as e:  # every waiting handler gets an error rather than hanging
            self.error = e
            for seq_id in list(self._streams):
                self._send_id(seq_id, Piece("", "error"))
            raise

    def _apply(self, first):
        commands = [first] if first is not None else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for command in commands:
            if command[0] == "add":
                _, prompt, params, chat, method, loop, reply = command
                try:
                    seq = self.llm.add_request(prompt, params, chat, method)
                except Exception as e:  # a ValueError is the client's; anything else reaches the handler too
                    reply.set_exception(e)
                    continue
                stream = RequestStream(seq)
                self._streams[seq.id] = (stream, loop)
                self.counters.requests += 1
                self.counters.prompt_tokens += len(seq.prompt_token_ids)
                reply.set_result(stream)
            elif command[0] == "abort":
                seq = command[1]
                if not seq.finished and seq.id in self._streams:
                    self.llm.abort(seq)
                    self.counters.aborted += 1
                    self._streams.pop(seq.id, None)

    def _send(self, seq: Sequence, piece: Piece):
        if piece.finish_reason is not None:
            self.counters.finished += 1
        self._send_id(seq.id, piece)

    def _send_id(self, seq_id: int, piece: Piece):
        entry = self._streams.get(seq_id)
        if entry is None:  # aborted: its client is gone
            return
        if piece.finish_reason is not None:
            del self._streams[seq_id]
        stream, loop = entry
        loop.call_soon_threadsafe(stream.pieces.put_nowait, piece)
