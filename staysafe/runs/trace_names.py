"""The names of the metric columns in traces and results, built and parsed here only.

``evals.parquet`` has, per evaluation step: ``asr_<judge>`` (greedy answers; ``asr_keyword`` always),
``asr_at_k_<judge>`` and ``asr_sampled_<judge>`` (sampled answers, with ``eval_samples > 0``: ASR@k and the mean
per-answer ASR), ``failed_<judge>``, ``over_refusal``, ``benign_nll``, ``task_accuracy``. ``generations.parquet``
has ``score_<judge>``. An experiment's results row has ``final_<metric>``, ``reference_<metric>`` (step 0) and
``peak_<metric>``, each ASR and over-refusal with its 95% interval as ``<column>_lo`` / ``<column>_hi``.
Judge names are the CLI's with ``-`` as ``_`` (``embedding-response`` -> ``embedding_response``).
"""

from __future__ import annotations

KEYWORD = "keyword"
ASR, AT_K, SAMPLED = "asr_", "asr_at_k_", "asr_sampled_"
STAGES = ("final_", "reference_", "peak_")
BOUNDS = ("_lo", "_hi")


def column_judge(judge_name: str) -> str:
    """A judge's name as it appears in column names."""
    return judge_name.replace("-", "_")


def asr(judge: str) -> str:
    return ASR + column_judge(judge)


def asr_at_k(judge: str) -> str:
    return AT_K + column_judge(judge)


def asr_sampled(judge: str) -> str:
    return SAMPLED + column_judge(judge)


def failed(judge: str) -> str:
    return "failed_" + column_judge(judge)


def score(judge: str) -> str:
    return "score_" + column_judge(judge)


def parse_asr(column: str) -> tuple[str, str] | None:
    """``(kind, judge)`` of an ASR column, kind ``asr`` | ``at_k`` | ``sampled``; None for any other column."""
    if column.endswith(BOUNDS):
        return None
    for prefix, kind in ((AT_K, "at_k"), (SAMPLED, "sampled"), (ASR, "asr")):
        if column.startswith(prefix) and len(column) > len(prefix):
            return kind, column[len(prefix):]
    return None


def judges(columns) -> list[str]:
    """The judges with a greedy ASR column among ``columns`` (``asr_<judge>``; not the sampled measures)."""
    found = (parse_asr(c) for c in columns)
    return sorted({p[1] for p in found if p is not None and p[0] == "asr"})


def sampled(columns) -> list[str]:
    """The sampled-answer ASR columns among ``columns``."""
    return [c for c in columns if (p := parse_asr(c)) is not None and p[0] != "asr"]


def staged(stage: str, column: str) -> str:
    """``final_`` / ``reference_`` / ``peak_`` + a metric column."""
    assert stage in STAGES, stage
    return stage + column


def result_judges(columns) -> list[str]:
    """The judges with a final greedy ASR in an experiment's results (``final_asr_<judge>``)."""
    return judges(c[len("final_"):] for c in columns if c.startswith("final_"))
