"""Qi et al. 2024 ("Safety Alignment Should Be Made More Than Just a Few Tokens Deep"): per answer token
``-(2/beta_t) log sigmoid(beta_t (log p(y_t) - log p_ref(y_t)))`` with a per-position schedule ``token_betas``
(:func:`staysafe.losses.tokenwise_loss`). ``adaptive-token-wise`` scales that schedule by the risk's beta / beta_max.
Each step also records, per answer position, the mean beta_t, loss term and log-ratio (``positions.parquet``)."""

from staysafe.methods.adaptive import RISK_OPTIONS
from staysafe.methods.base import Method, TrainingHooks, Variant


class TokenWiseHooks(TrainingHooks):
    @staticmethod
    def beta(policy, risk):  # the level that scales token_betas
        import torch

        return torch.ones_like(risk), float("nan")

    def loss(self, nll_tok, kl_tok, rows, beta, labels, keep, ref_logits):
        from staysafe.losses import (
            answer_token_losses,
            answer_token_positions,
            position_betas,
            regularised_loss,
            tokenwise_loss,
        )

        pos = answer_token_positions(labels, keep)
        betas = position_betas(pos, self.trainer.args.position_betas()) * beta.to(nll_tok.device)[rows]
        ref_nll = answer_token_losses(ref_logits, labels, positions=keep)[0]
        loss, _, per_token = tokenwise_loss(nll_tok, ref_nll, rows, betas, labels.shape[0])
        _, nll_i, kl_i = regularised_loss(nll_tok, kl_tok, rows, beta, True)
        return loss, nll_i, kl_i, (pos, betas.detach(), per_token.detach(), (ref_nll - nll_tok).detach())


class AdaptiveTokenWiseHooks(TokenWiseHooks):
    @staticmethod
    def beta(policy, risk):
        beta, s = policy.adaptive(risk)
        return (beta / policy.o.beta_max if policy.o.beta_max > 0 else beta), s


TOKEN_WISE = Method("token-wise", "Qi et al. 2024's per-position constraint (token_betas)", TokenWiseHooks,
                    kl_weight=False, top_k_reference=False, options=("token_betas",))
ADAPTIVE_TOKEN_WISE = Method("adaptive-token-wise", "that constraint scaled by the risk's beta / beta_max",
                             AdaptiveTokenWiseHooks, risk=True, kl_weight=False, top_k_reference=False,
                             options=("token_betas", *RISK_OPTIONS))
VARIANTS = (Variant("token-wise", "token-wise", "#5b8c3a", "token-wise (Qi et al.)"),
            Variant("adaptive-token-wise", "adaptive-token-wise", "#1f9bb0", "adaptive token-wise",
                    {"risk": "probe"}))
