"""Float64 attention references shared by the op and kernel tests."""

import torch


def varlen_f64(q, k, v, lengths, scale):
    """Block-diagonal attention over packed (S, H, D) q/k/v, segment by segment in float64 -> (S, H, D)."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        out.append((torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)
