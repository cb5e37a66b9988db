"""Safety judges: score how harmful each training example is, as one source of the trainer's risk signal.

Backends (one module each): :class:`KeywordJudge` (refusal strings), :class:`LocalLMJudge` (a local chat model's
rating-digit probabilities), :class:`OpenAICompatibleJudge` (any OpenAI-compatible endpoint, e.g. Llama Guard on
vLLM), :class:`EmbeddingJudge` (MiniLM embeddings + a logistic head), :class:`ReaderJudge` (a small transformer
fine-tuned on the labelled answers). :func:`score_cached` scores a data set once
and keeps the scores on disk. Heavy libraries (torch, transformers, scikit-learn) load only when a backend needs
them.
"""

from __future__ import annotations

from staysafe.judges.base import RUBRIC_VERSION, Judge, JudgeScore, rating_to_score
from staysafe.judges.cache import cache_path, score_cached
from staysafe.judges.embedding import EmbeddingJudge
from staysafe.judges.keyword import REFUSAL_MARKERS, KeywordJudge, is_refusal
from staysafe.judges.local_lm import LocalLMJudge
from staysafe.judges.openai_compat import OpenAICompatibleJudge
from staysafe.judges.reader import ReaderJudge
from staysafe.options import JUDGES, SpecError


def make_judge(name: str, **options) -> Judge:
    """A judge by name: keyword | embedding | embedding-response | reader | local-lm | openai.

    Options go to the backend's constructor; for the embedding and reader judges ``path=`` loads a saved one instead
    of the shipped default.
    """
    if name == "keyword":
        return KeywordJudge(**options)
    if name in ("embedding", "embedding-response"):
        kind = "request" if name == "embedding" else "response"
        path = options.pop("path", None)
        if options:
            raise SpecError(f"judge {name!r} takes only path=, got {sorted(options)}")
        judge = EmbeddingJudge.load(path) if path else EmbeddingJudge.default(kind)
        if judge.kind != kind:
            raise SpecError(f"{path} holds a {judge.kind!r} embedding judge, but {name!r} needs kind {kind!r}")
        return judge
    if name == "reader":
        path = options.pop("path", None)
        if options:
            raise SpecError(f"judge 'reader' takes only path=, got {sorted(options)}")
        return ReaderJudge.load(path) if path else ReaderJudge.default()
    if name == "local-lm":
        return LocalLMJudge(**options)
    if name == "openai":
        return OpenAICompatibleJudge(**options)
    raise SpecError(f"unknown judge {name!r}: choose one of {', '.join(JUDGES)}")


__all__ = [
    "JUDGES", "RUBRIC_VERSION", "REFUSAL_MARKERS", "EmbeddingJudge", "Judge", "JudgeScore", "KeywordJudge",
    "LocalLMJudge", "OpenAICompatibleJudge", "ReaderJudge", "cache_path", "is_refusal", "make_judge", "rating_to_score",
    "score_cached",
]
