"""The regulariser's losses as pure functions of logits and labels (no trainer state), so they can be tested alone
and extended (other heads, cached reference outputs) without touching the training step.

    loss = (1 - beta) * NLL + beta * KL(ref || model)      over answer tokens
    token-wise (Qi et al. 2024): loss_t = -(2 / beta_t) log sigmoid(beta_t (log p(y_t) - log p_ref(y_t)))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position without loss (prompt, padding): what the Trainer ignores


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is an answer token in at least one row: the only positions where the
    NLL and the KL need the language-model head (``logits_to_keep``), instead of a full B x T x V projection."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def _targets(labels, positions):
    """The next token at each position (all positions, or only ``positions``)."""
    return labels[:, 1:] if positions is None else labels[:, positions + 1]


def answer_token_losses(logits, labels, ref_logits=None, top_k: int = 0, positions=None, ref_topk=None):
    """NLL and KL(ref || model) of every answer token, with the batch row each token belongs to. ``logits`` (and
    ``ref_logits``) are either over every position, or only at ``positions`` (see :func:`answer_positions`).
    ``ref_topk`` (the reference's top-k log-probabilities and token ids per answer token, e.g. cached by
    :class:`staysafe.reference.ReferenceCache`) stands in for ``ref_logits`` and gives the top-k KL."""
    if positions is None:
        logits = logits[:, :-1]
        ref_logits = ref_logits[:, :-1] if ref_logits is not None else None
    targets = _targets(labels, positions)
    mask = targets != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    logp = logits[mask].float().log_softmax(-1)
    nll = -logp.gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    if ref_topk is not None:
        return nll, topk_kl(logp, *ref_topk), rows
    if ref_logits is None:
        return nll, None, rows
    ref_logp = ref_logits[mask].float().log_softmax(-1)
    return nll, token_kl(logp, ref_logp, top_k), rows


def answer_rows(labels, positions=None) -> torch.Tensor:
    """The batch row of every answer token, in the order :func:`answer_token_losses` returns them."""
    return (_targets(labels, positions) != IGNORE).nonzero(as_tuple=True)[0]


def reference_topk(ref_logits, labels, top_k: int, positions=None):
    """The reference's top-k log-probabilities and their token ids at every answer token (what the top-k KL needs
    and the reference cache keeps)."""
    logits = ref_logits[:, :-1] if positions is None else ref_logits
    return logits[_targets(labels, positions) != IGNORE].float().log_softmax(-1).topk(top_k, dim=-1)


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """KL(ref || model) per token from log-probabilities [T, V]; with ``top_k`` the coarsened :func:`topk_kl`."""
    if top_k and top_k < ref_logp.shape[-1]:
        return topk_kl(logp, *ref_logp.topk(top_k, dim=-1))
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def topk_kl(logp: torch.Tensor, ref_top: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """KL between the two distributions coarsened to {top-k tokens of the reference, everything else}: a lower
    bound of the exact KL that needs only the reference's top-k (its error is measured in benchmarks/)."""
    top = logp.gather(1, idx.long())
    p, q = ref_top.exp(), top.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
    return (p * (ref_top - top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def per_example_mean(values: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of token values per batch row (0 for a row without answer tokens)."""
    sums = torch.zeros(batch_size, device=values.device, dtype=values.dtype).index_add(0, rows, values)
    counts = torch.bincount(rows, minlength=batch_size).clamp_min(1)
    return sums / counts


def regularised_loss(nll_tok, kl_tok, rows, beta: torch.Tensor, per_example_beta: bool):
    """The blended loss of a micro-batch, plus the per-example NLL and KL it was made of.

    ``beta`` has one value per example. Per batch, the NLL and KL are means over all answer tokens; per example,
    each example's token means are blended with its own beta and averaged. Without a reference (``kl_tok`` None:
    sft) the loss is the NLL.
    """
    n = beta.shape[0]
    nll_i = per_example_mean(nll_tok, rows, n)
    kl_i = per_example_mean(kl_tok, rows, n) if kl_tok is not None else torch.zeros_like(nll_i)
    if per_example_beta:
        return ((1 - beta) * nll_i + beta * kl_i).mean(), nll_i, kl_i
    if kl_tok is None:
        return nll_tok.mean(), nll_i, kl_i
    b = beta[0]
    return (1 - b) * nll_tok.mean() + b * kl_tok.mean(), nll_i, kl_i


def answer_token_positions(labels, positions=None) -> torch.Tensor:
    """The position of every answer token within its answer (1 = its first token), in the order of
    :func:`answer_token_losses`."""
    mask = _targets(labels, positions) != IGNORE
    return mask.long().cumsum(1)[mask]


def position_betas(token_positions: torch.Tensor, schedule: list[float]) -> torch.Tensor:
    """beta_t of each answer token from a per-position schedule; the last value holds for every later position."""
    table = torch.tensor(schedule, dtype=torch.float32, device=token_positions.device)
    return table[(token_positions - 1).clamp(0, len(schedule) - 1)]


def tokenwise_loss(nll_tok, ref_nll_tok, rows, betas, batch_size: int):
    """Qi et al. 2024's token-wise constrained objective, mean over answer tokens: ``-(2 / beta_t) log sigmoid(
    beta_t * (log p(y_t) - log p_ref(y_t)))``. As beta_t -> 0 its gradient is the NLL's; a large beta_t stops
    pushing once the model's log-probability of the token passes the reference's, so the answer's first tokens
    (large beta) stay near the safe reference. Computed as ``-(2 / beta_t) (log sigmoid(beta_t delta) + log 2)``:
    the same gradient, 0 where the model equals the reference, and finite down to beta_t = 0, where it is the
    limit ``-delta`` (plain fine-tuning; adaptive-token-wise reaches it with beta_min = 0 on a risk-0 example).
    Returns the loss and its per-example means."""
    log_ratio = ref_nll_tok - nll_tok
    tiny = betas < 1e-6
    safe = torch.where(tiny, torch.ones_like(betas), betas)  # no inf in the branch torch.where does not pick
    per_token = torch.where(tiny, -log_ratio, -(2.0 / safe) * (F.logsigmoid(safe * log_ratio) + math.log(2.0)))
    return per_token.mean(), per_example_mean(per_token.detach(), rows, batch_size), per_token
