"""Chat templates rendered with time and memory limits, by transformers' own code.

A chat template is a program from the model's author. transformers runs it in Jinja's
immutable sandbox, which stops attribute tricks but not cost: nested ``range(100000)``
loops, ``'x' * 10**10`` or a namespace doubling a string sixty times run for hours or fill
memory. So each tokenizer gets a worker process (``python -m merge_core.template_sandbox``)
that holds a copy of the tokenizer, caps its own address space at what it uses once
loaded plus ``MEMORY_BYTES``, and renders with ``tokenizer.apply_chat_template`` itself, so
the text is exactly what transformers gives. The caller waits at most ``TIMEOUT_S`` per
render and refuses an output over ``MAX_OUTPUT_CHARS``; a worker that overruns is killed
and the render raises ``TemplateLimitError`` (one line). The worker starts once per
tokenizer and stays for the process's life (a pipe round trip per prompt, well under a
millisecond beside the template itself).
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import weakref
from typing import Any

from merge_core.errors import BrmergeError

# A real chat prompt (five answered exam questions) is ~20k characters; templates run in
# milliseconds. The limits sit orders of magnitude above, and far below harm.
TIMEOUT_S = 30.0
MAX_OUTPUT_CHARS = 10_000_000
MEMORY_BYTES = 2 << 30
# The first render also waits for the worker to import transformers and load the tokenizer.
_START_TIMEOUT_S = 120.0


class TemplateLimitError(BrmergeError):
    """A chat template ran too long, used too much memory or printed too much."""


class TemplateRaised(Exception):
    """The template itself raised (``raise_exception``, a Jinja error): ``kind`` and text."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _send(stream: Any, obj: object) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(blob)) + blob)
    stream.flush()


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    import time

    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Worker:
    def __init__(self, tokenizer: Any):
        self._proc = subprocess.Popen([sys.executable, "-m", "merge_core.template_sandbox"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _send(self._proc.stdin, (tokenizer, MEMORY_BYTES))
        self._started = False
        self._lock = threading.Lock()

    def render(self, messages: list[dict[str, Any]], kwargs: dict[str, Any], *, model: str) -> str:
        import time

        with self._lock:
            try:
                if not self._started:   # the worker says when it has loaded the tokenizer
                    self._receive(time.monotonic() + _START_TIMEOUT_S)
                    self._started = True
                _send(self._proc.stdin, (messages, kwargs, MAX_OUTPUT_CHARS))
                status, payload = self._receive(time.monotonic() + TIMEOUT_S)
            except TimeoutError:
                self.close()
                raise TemplateLimitError(
                    f"the chat template of {model} took more than {TIMEOUT_S:g} s to render one prompt "
                    "(a loop that never ends or runs too long): fix or replace the template") from None
            except (EOFError, BrokenPipeError, OSError):
                self.close()
                raise TemplateLimitError(
                    f"the chat template of {model} stopped its renderer (it used more than "
                    f"{MEMORY_BYTES >> 30} GiB of memory, or crashed): fix or replace the template") from None
        if status == "ok":
            return payload
        if status == "too_big":
            raise TemplateLimitError(f"the chat template of {model} {payload}: fix or replace the template")
        raise TemplateRaised(*payload)

    def _receive(self, deadline: float) -> tuple[str, Any]:
        (n,) = struct.unpack("<Q", _read_exact(self._proc.stdout.fileno(), 8, deadline))
        return pickle.loads(_read_exact(self._proc.stdout.fileno(), n, deadline))

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for s in (self._proc.stdin, self._proc.stdout):
            try:
                s.close()
            except OSError:
                pass


_workers: weakref.WeakKeyDictionary[Any, _Worker] = weakref.WeakKeyDictionary()
_by_id: dict[int, _Worker] = {}   # tokenizers that cannot be weakly referenced


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], *, model: str = "the model",
                        **kwargs: Any) -> str:
    """``tokenizer.apply_chat_template(messages, **kwargs)`` (``tokenize=False``) run in the
    tokenizer's limited worker. A template error is raised as ``jinja2``'s ``TemplateError``
    (as transformers raises it), an overrun as ``TemplateLimitError``."""
    worker = _worker_for(tokenizer)
    # the template as the caller's tokenizer has it now (the worker's copy is from its start)
    template = tokenizer.get_chat_template(kwargs.pop("chat_template", None), tools=kwargs.get("tools"))
    try:
        return worker.render(messages, {**kwargs, "chat_template": template, "tokenize": False}, model=model)
    except TemplateRaised as e:
        import jinja2

        if e.kind == "template":
            raise jinja2.exceptions.TemplateError(str(e)) from None
        raise TemplateLimitError(f"the chat template of {model} failed: {e.kind}: {e}".replace("\n", " ")) from None


def _worker_for(tokenizer: Any) -> _Worker:
    try:
        worker = _workers.get(tokenizer)
    except TypeError:
        worker = _by_id.get(id(tokenizer))
    if worker is None or not worker.alive():
        worker = _Worker(tokenizer)
        try:
            _workers[tokenizer] = worker
        except TypeError:
            _by_id[id(tokenizer)] = worker
    return worker


# --- the worker -------------------------------------------------------------------------

def _limit_memory(extra: int) -> None:
    import ctypes
    import resource
    import signal

    # die with the parent, even one killed with SIGKILL mid-render (PR_SET_PDEATHSIG = 1)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)

    with open("/proc/self/statm") as f:   # size in pages: what the loaded worker maps now
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, used + extra))


def _serve() -> None:
    import jinja2

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    (n,) = struct.unpack("<Q", _read_exact(stdin.fileno(), 8, None))
    tokenizer, memory = pickle.loads(_read_exact(stdin.fileno(), n, None))
    _limit_memory(memory)
    _send(stdout, ("ready", None))
    while True:
        try:
            (n,) = struct.unpack("<Q", _read_exact(stdin.fileno(), 8, None))
        except EOFError:
            return
        messages, kwargs, max_chars = pickle.loads(_read_exact(stdin.fileno(), n, None))
        try:
            text = tokenizer.apply_chat_template(messages, **kwargs)
            reply = ("ok", text) if len(text) <= max_chars else (
                "too_big", f"printed {len(text)} characters for one prompt (more than {max_chars})")
        except MemoryError:
            return   # the parent reports the memory limit
        except jinja2.exceptions.TemplateError as e:
            reply = ("error", ("template", str(e)))
        except Exception as e:  # the template's own failure, reported to the caller as one line
            reply = ("error", (type(e).__name__, str(e)))
        _send(stdout, reply)


if __name__ == "__main__":
    _serve()
