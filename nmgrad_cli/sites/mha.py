"""``F.multi_head_attention_forward`` written with its four projections as GEMM sites.

A TorchFunctionMode cannot see the ``linear`` calls inside this Python-level torch function, so the
mode computes the whole function here instead, with the same math (torch's docs and source):

    q, k, v = X_q W_q^T + b_q, X_k W_k^T + b_k, X_v W_v^T + b_v     (rows of in_proj_weight, or separate)
    A = softmax(q k^T / sqrt(D) + mask)  (dropout on A while training)
    Y = (A v) W_o^T + b_o                                           (out_proj)

Masks follow torch: boolean True means "may not attend", float masks are added; ``key_padding_mask``
(B, S) is merged into ``attn_mask`` (L, S) or (B*H, L, S). ``bias_k``/``bias_v``, ``add_zero_attn``
and ``static_k``/``static_v`` are not handled here: such a call runs as torch's own function and its
projections are reported as not intercepted. Tested against torch's function in tests/test_sites.py.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

_SIG = inspect.signature(F.multi_head_attention_forward)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.bool(), float("-inf"))


def mha_forward(mode, args: tuple, kwargs: dict):
    """The attention output and weights of ``F.multi_head_attention_forward(*args, **kwargs)`` with
    every projection run through ``mode.run`` (a :class:`~.intercept.SiteMode`); NotImplemented when
    no projection weight is a model parameter or the call uses a feature this function lacks."""
    p = _SIG.bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    separate = a["use_separate_proj_weight"]
    weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]] if separate else [a["in_proj_weight"]]
    names = [mode.index.name(w) for w in weights]
    out_name = mode.index.name(a["out_proj_weight"])
    if all(n is None for n in names) and out_name is None:
        return NotImplemented
    extra = [k for k in ("bias_k", "bias_v", "static_k", "static_v") if a[k] is not None]
    if extra or a["add_zero_attn"] or any(n is None for n in names) or out_name is None:
        why = "MultiheadAttention with " + (", ".join(extra) or "add_zero_attn or a weight that is not a parameter")
        for n in [*names, out_name]:
            if n is not None:
                mode.note(n, f"{why}: runs as torch's own function, not intercepted")
        return NotImplemented

    query, key, value = a["query"], a["key"], a["value"]
    kpm, attn_mask = a["key_padding_mask"], a["attn_mask"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        kpm = kpm.unsqueeze(0) if kpm is not None else None
    L, B, E = query.shape  # noqa: N806 (target length, batch, embedding)
    S = key.shape[0]  # noqa: N806
    H = a["num_heads"]  # noqa: N806
    D = E // H  # noqa: N806
    if E != a["embed_dim_to_check"] or D * H != E:
        return NotImplemented  # torch's own function raises its error

    bias = a["in_proj_bias"]
    if separate:
        parts = [(mode.site(n, "linear", "MultiheadAttention"), w, None if bias is None else bias[i * E:(i + 1) * E])
                 for i, (n, w) in enumerate(zip(names, weights))]
    else:
        w = weights[0]
        parts = [(mode.site(names[0], "linear", "MultiheadAttention", part, (i * E, (i + 1) * E)), w, bias)
                 for i, part in enumerate("qkv")]
    q, k, v = (mode.run(site, x, w, b) for (site, w, b), x in zip(parts, (query, key, value)))  # (L|S, B, E)

    q = q.reshape(L, B * H, D).transpose(0, 1)  # (B*H, L, D)
    k = k.reshape(S, B * H, D).transpose(0, 1)  # (B*H, S, D)
    v = v.reshape(S, B * H, D).transpose(0, 1)

    mask = _float_mask(attn_mask, q.dtype)
    if mask is None and a["is_causal"]:
        mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)  # (1, L, S)
    kpm = _float_mask(kpm, q.dtype)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S).expand(-1, H, -1, -1).reshape(B * H, 1, S)
        mask = kpm if mask is None else mask + kpm

    scores = torch.bmm(q * (1.0 / math.sqrt(D)), k.transpose(1, 2))  # (B*H, L, S)
    if mask is not None:
        scores = scores + mask
    attn = torch.softmax(scores, dim=-1)
    if a["training"] and a["dropout_p"] > 0.0:
        attn = F.dropout(attn, p=a["dropout_p"])
    out = torch.bmm(attn, v).transpose(0, 1).reshape(L * B, E)  # (L*B, E)
    out_site = mode.site(out_name, "linear", "MultiheadAttention")
    out = mode.run(out_site, out, a["out_proj_weight"], a["out_proj_bias"]).view(L, B, E)

    attn_weights = None
    if a["need_weights"]:
        attn_weights = attn.view(B, H, L, S)
        if a["average_attn_weights"]:
            attn_weights = attn_weights.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        attn_weights = attn_weights.squeeze(0) if attn_weights is not None else None
    return out, attn_weights
