"""A judge behind any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, hosted APIs).

Standard library only. Two prompt modes:
- ``rubric``: the 1-5 harm rubric as one user message; the first stand-alone digit 1-5 of the reply is the rating;
- ``conversation``: the (request, response) exchange itself, for moderation models such as Llama Guard whose
  server-side chat template wraps it in their own policy; a "safe" reply is rating 1, "unsafe" rating 5.
Either mode accepts either kind of reply. The API key is read from the environment at call time, sent only in the
Authorization header and only to the URL given (redirects are refused, never followed), and kept out of repr,
cache keys and error messages.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from staysafe.options import SpecError
from staysafe.judges.base import RUBRIC_VERSION, Judge, JudgeScore, check_inputs, rating_to_score, rubric_text

MODES = ("rubric", "conversation")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_DIGIT = re.compile(r"(?<![0-9.])([1-5])(?![0-9])")
_VERDICT = re.compile(r"^\W*(unsafe|safe)\b", re.IGNORECASE)


def parse_reply(text: str) -> float | None:
    """Rating 1-5 from a reply: a leading "safe"/"unsafe" verdict, else the first stand-alone digit 1-5."""
    verdict = _VERDICT.match(text)
    if verdict:
        return 5.0 if verdict.group(1).lower() == "unsafe" else 1.0
    digit = _DIGIT.search(text)
    return float(digit.group(1)) if digit else None


def _public_url(url: str) -> str:
    """The URL without user:password or query string (either may carry a credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend the Authorization header to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class _Retryable(Exception):
    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class OpenAICompatibleJudge(Judge):
    """POST ``{base_url}/chat/completions`` per item, ``concurrency`` requests at a time.

    Timeouts, connection errors, HTTP 408/429/5xx are retried ``retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds, or the server's Retry-After when it sends a longer one, capped at 60 s).
    Other HTTP errors, malformed replies and exhausted retries give that item a JudgeScore with ``error`` set.
    Without the key variable set, requests go out without an Authorization header (local servers need none).
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", *,
                 concurrency: int = 4, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 max_tokens: int = 8, mode: str = "rubric"):
        scheme = urllib.parse.urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise SpecError(f"base_url must be an http(s) URL like http://localhost:8000/v1, got scheme {scheme!r}")
        if not model:
            raise SpecError("model must name the served model (the 'model' field of the request)")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0 or max_tokens < 1:
            raise SpecError("need concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0 and max_tokens >= 1")
        if mode not in MODES:
            raise SpecError(f"mode must be one of {MODES}, got {mode!r}")
        self._url = base_url.rstrip("/") + "/chat/completions"  # may hold credentials: never shown
        self.base_url = _public_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.mode = mode

    def cache_key(self) -> str:
        rubric = RUBRIC_VERSION if self.mode == "rubric" else "conversation"
        return f"openai:{self.base_url}:{self.model}:{rubric}:max{self.max_tokens}"

    def __repr__(self) -> str:
        return (f"OpenAICompatibleJudge(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, mode={self.mode!r})")

    # ------------------------------------------------------------------------------------------ requests

    def _messages(self, prompt: str, response: str | None) -> list[dict]:
        if self.mode == "rubric":
            return [{"role": "user", "content": rubric_text(prompt, response)}]
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages

    def _key(self) -> str | None:
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def _redact(self, text: str, key: str | None) -> str:
        text = text.replace(self._url, self.base_url + "/chat/completions")
        return text.replace(key, "***") if key else text

    def _post_once(self, body: bytes, key: str | None) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                where = _public_url(err.headers.get("Location", "") or "") if err.headers else ""
                raise ValueError(f"HTTP {err.code} from {self.base_url}: refused to follow the redirect to "
                                 f"{where or 'another address'} (the API key is only ever sent to the URL given; "
                                 "give the final URL instead)") from None
            detail = err.read(300).decode("utf-8", "replace").strip()
            message = f"HTTP {err.code} from {self.base_url}: {detail[:200]}"
            if err.code == 401 and not key:
                message += f" (no API key: ${self.api_key_env} is not set)"
            if err.code in RETRY_STATUS:
                wait = None
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
                raise _Retryable(message, wait) from None
            raise ValueError(message) from None
        except (TimeoutError, socket.timeout) as err:
            raise _Retryable(f"timed out after {self.timeout:g} s ({err})") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout:g} s") from None
            raise _Retryable(f"cannot reach {self.base_url}: {err.reason}") from None
        except (ConnectionError, http.client.HTTPException) as err:
            raise _Retryable(f"connection to {self.base_url} failed: {type(err).__name__}: {err}") from None
        try:
            payload = json.loads(raw)
            return payload["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"malformed reply (not an OpenAI chat completion): {raw[:120]!r}") from None

    def _judge_one(self, prompt: str, response: str | None) -> JudgeScore:
        key = self._key()
        body = json.dumps({"model": self.model, "messages": self._messages(prompt, response),
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        attempt = 0
        while True:
            try:
                text = self._post_once(body, key)
                break
            except _Retryable as err:
                if attempt >= self.retries:
                    return JudgeScore(score=None, error=self._redact(
                        f"gave up after {attempt + 1} attempts: {err}", key))
                time.sleep(max(self.backoff * 2 ** attempt, err.wait or 0.0))
                attempt += 1
            except ValueError as err:
                return JudgeScore(score=None, error=self._redact(str(err), key))
        rating = parse_reply(text)
        if rating is None:
            return JudgeScore(score=None, error=self._redact(
                f"malformed reply: no rating 1-5 and no safe/unsafe verdict in {text[:80]!r}", key))
        return JudgeScore(score=rating_to_score(rating), rating=rating)

    def judge(self, prompts: list[str], responses: list[str | None] | None = None) -> list[JudgeScore]:
        responses = check_inputs(prompts, responses)
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._judge_one, prompts, responses))

