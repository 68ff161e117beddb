"""The BERT encoder's forwards over a chunk of token ids: how a chunk is laid out, and how it runs.

A chunk of tokenised prompts is sorted by token length and laid out one of two ways (``plan_chunk``):

* *packed* (CPU fp32): the tokens of consecutive prompts back to back, no padding at all, ~4k tokens
  per batch, run by ``PackedBert``: attention per group of equal-length prompts (no mask needed, mean
  pooling is a plain mean), linears on oneDNN with pre-packed fp32 weights, Q/K/V fused into one GEMM
  and GELU fused into the FFN GEMM (faster than MKL's sgemm, which the stock ``nn.Linear`` uses);
* *length bands* (CUDA, reduced precision): prompts padded only within narrow bands of lengths, many
  lengths per forward under a token budget (so short prompts go in large batches), run by
  ``run_bands`` on the transformers BertModel with SDPA attention and masked mean pooling, the vectors
  kept on the device until the chunk is done.

``pipeline.data.prompt_encoder.PromptEncoder`` picks the path and checks each against the transformers
model at load time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

TokenForward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


# -- the packed CPU kernel -------------------------------------------------------------------------------


@dataclass
class _Layer:
    qkv: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    ln1: tuple[torch.Tensor, torch.Tensor]
    inter: tuple[torch.Tensor, torch.Tensor]
    ffn_out: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]


class PackedBert:
    """A BERT encoder forward over *packed* sequences: no padding, no mask, any mix of lengths.

    The token rows of a whole batch are concatenated, so the GEMMs, LayerNorms and GELUs (about 90%
    of the time) run on exactly the real tokens; only attention is split, one SDPA call per group of
    equal-length sequences (no mask needed inside a group).  Linears run on oneDNN with pre-packed
    fp32 weights, Q/K/V fused into one GEMM and GELU fused as a post-op ("onednn"), or on plain
    F.linear ("torch").  Same arithmetic as transformers' BertModel in fp32; checked at load time.
    """

    def __init__(self, bert: torch.nn.Module, linear: str = "onednn"):
        cfg = bert.config
        if getattr(cfg, "model_type", None) != "bert":
            raise ValueError("not a BERT model")
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute" or cfg.hidden_act != "gelu":
            raise ValueError("unsupported BERT variant")
        if linear == "onednn" and not (
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        ):
            raise RuntimeError("oneDNN linear ops are not available in this torch build")
        self.onednn = linear == "onednn"
        self.heads = cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.layer_norm_eps
        emb = bert.embeddings
        with torch.inference_mode():
            self.word = emb.word_embeddings.weight.detach().clone()
            self.position = emb.position_embeddings.weight.detach().clone()
            self.token_type0 = emb.token_type_embeddings.weight[0].detach().clone()
            self.emb_ln = self._ln(emb.LayerNorm)
            self.layers = []
            for layer in bert.encoder.layer:
                att = layer.attention.self
                wqkv = torch.cat([att.query.weight, att.key.weight, att.value.weight])
                bqkv = torch.cat([att.query.bias, att.key.bias, att.value.bias])
                self.layers.append(
                    _Layer(
                        qkv=self._pack(wqkv, bqkv),
                        out=self._pack(layer.attention.output.dense.weight, layer.attention.output.dense.bias),
                        ln1=self._ln(layer.attention.output.LayerNorm),
                        inter=self._pack(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
                        ffn_out=self._pack(layer.output.dense.weight, layer.output.dense.bias),
                        ln2=self._ln(layer.output.LayerNorm),
                    )
                )

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.detach().float().contiguous()
        if self.onednn:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return weight, bias.detach().float().contiguous()

    @staticmethod
    def _ln(module: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return module.weight.detach().clone(), module.bias.detach().clone()

    def _linear(self, x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], gelu: bool = False) -> torch.Tensor:
        if self.onednn:
            # algorithm "none" = the exact (erf) GELU of BERT's "gelu".
            return torch.ops.mkldnn._linear_pointwise(
                x, packed[0], packed[1], "gelu" if gelu else "none", [], "none" if gelu else ""
            )
        y = F.linear(x, packed[0], packed[1])
        return F.gelu(y) if gelu else y

    def mean_pooled(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean of the last token states of each sequence, shape (n, hidden); input sorted by length."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum()))
        return self.mean_pooled_flat(flat, lengths)

    def mean_pooled_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """mean_pooled of sequences given as their concatenated tokens and their lengths (sorted ascending)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if np.any(lengths[1:] < lengths[:-1]):
            raise ValueError("sequences must be sorted by length")
        # (start token, number of sequences, length) of each run of equal lengths.
        firsts = np.flatnonzero(np.diff(lengths, prepend=-1)) if len(lengths) else np.zeros(0, np.int64)
        counts = np.diff(np.append(firsts, len(lengths)))
        token_starts = np.concatenate([[0], np.cumsum(lengths)])[firsts]
        groups = [(int(s0), int(n), int(lengths[f])) for s0, n, f in zip(token_starts, counts, firsts)]
        hidden, heads = self.hidden, self.heads
        flat = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        positions = torch.cat([torch.arange(length).repeat(n) for _, n, length in groups])
        x = self.word[flat] + self.position[positions] + self.token_type0
        x = F.layer_norm(x, (hidden,), *self.emb_ln, self.eps)
        att = torch.empty_like(x)
        for layer in self.layers:
            qkv = self._linear(x, layer.qkv)
            for s0, n, length in groups:
                part = qkv[s0 : s0 + n * length].view(n, length, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
                out = F.scaled_dot_product_attention(part[0], part[1], part[2])
                att[s0 : s0 + n * length] = out.transpose(1, 2).reshape(n * length, hidden)
            x = F.layer_norm(self._linear(att, layer.out) + x, (hidden,), *layer.ln1, self.eps)
            h = self._linear(x, layer.inter, gelu=True)
            x = F.layer_norm(self._linear(h, layer.ffn_out) + x, (hidden,), *layer.ln2, self.eps)
        return torch.cat([x[s0 : s0 + n * length].view(n, length, hidden).mean(1) for s0, n, length in groups])


def is_mean_pooling(module: torch.nn.Module) -> bool:
    """True when an SBERT Pooling module does plain mean pooling over all tokens (v3-v6 configs)."""
    mode = getattr(module, "pooling_mode", None)
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        return modes == ("mean",) and getattr(module, "include_prompt", True)
    flags = {
        k: getattr(module, f"pooling_mode_{k}", False)
        for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
    }
    return flags["mean_tokens"] and not any(v for k, v in flags.items() if k != "mean_tokens")


def checked_packed_kernel(
    bert: torch.nn.Module, reference: TokenForward, linears: Sequence[str] = ("onednn", "torch")
) -> tuple[PackedBert | None, str, list[str]]:
    """The packed kernel of ``bert`` with the first of ``linears`` that builds and matches ``reference`` (the
    transformers model's forward) on mixed lengths: (kernel, its linears, why earlier ones did not), or
    (None, "", why none did)."""
    errors = []
    for linear in linears:
        try:
            kernel = PackedBert(bert, linear=linear)
            gen = torch.Generator().manual_seed(0)
            probe = [
                torch.randint(1000, bert.config.vocab_size, (n, length), generator=gen)
                for n, length in ((2, 5), (3, 17))
            ]
            with torch.inference_mode():
                want = torch.cat([reference(p, None).mean(1) for p in probe])
                got = kernel.mean_pooled([row for p in probe for row in p.tolist()])
            if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"differs from BertModel by {float((want - got).abs().max()):.2e}")
        except Exception as err:  # unsupported torch build / variant: try the next, else stay with HF
            errors.append(f"{linear}: {err}")
            continue
        return kernel, linear, errors
    return None, "", errors


# -- the transformers model (band batches) --------------------------------------------------------------


def bert_forward(bert: torch.nn.Module) -> TokenForward:
    """(ids [B, L], attention mask [B, L] or None) -> last hidden states, with SDPA attention where available."""
    setter = getattr(bert, "set_attn_implementation", None)
    if setter is not None and getattr(bert.config, "_attn_implementation", None) != "sdpa":
        with contextlib.suppress(Exception):  # an older transformers / a model without SDPA: keep its attention
            setter("sdpa")

    def forward(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return bert(input_ids=ids, attention_mask=mask).last_hidden_state

    return forward


# -- chunk layouts: packed, or length bands --------------------------------------------------------------


@dataclass
class Chunk:
    """A tokenised chunk, sorted by token length, laid out for the device (built off the main thread).

    ``order[k]``: the chunk position of the k-th shortest prompt; ``lengths``: their token counts.
    ``tokens``: int32 — the packed kernel's concatenated tokens (no padding), or the band batches' padded
    rows back to back; ``batches``: (first sorted row, rows, padded length, token offset) per forward.
    """

    size: int
    order: np.ndarray
    lengths: np.ndarray
    tokens: np.ndarray | torch.Tensor
    batches: list[tuple[int, int, int, int]]


def length_bands(
    sorted_lengths: np.ndarray, tokens_per_batch: int, slack: float = 0.125, min_width: int = 4
) -> list[tuple[int, int, int]]:
    """Forward batches over length-sorted sequences: (start, stop, padded length) each.

    A batch starts at the shortest remaining sequence (length l) and takes the following ones while their
    length stays within the band l + max(min_width, slack * l) and rows * padded length <= tokens_per_batch
    (at least one row).  So short prompts go in large batches, every length band is one or a few
    forwards, and padding is bounded by the band width.
    """
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    n, out, start = len(lengths), [], 0
    budget = max(1, int(tokens_per_batch))
    while start < n:
        low = int(lengths[start])
        cap = low + max(int(min_width), int(low * slack))
        band_stop = int(np.searchsorted(lengths, cap, side="right"))
        limit = min(band_stop, start + max(1, budget // max(low, 1)))
        rows = np.arange(1, limit - start + 1)
        fits = rows * lengths[start:limit] <= budget  # padded tokens if the batch ended at each row
        stop = start + max(1, int(np.count_nonzero(fits)))
        out.append((start, stop, int(lengths[stop - 1])))
        start = stop
    return out


def plan_chunk(
    ids: list[list[int]], tokens_per_batch: int, *, packed: bool, band_slack: float = 0.125, pin_memory: bool = False
) -> Chunk:
    """Sort by length and lay the tokens out for the forwards (CPU work, runs in the prefetch thread).

    ``packed``: the packed kernel's layout, else length bands.  ``pin_memory`` (CUDA): the band layout's
    arrays as pinned tensors, so the one host-to-device copy per chunk is asynchronous.
    """
    n = len(ids)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    lengths = lengths[order]
    flat = np.fromiter(chain.from_iterable(ids[i] for i in order), dtype=np.int32, count=int(lengths.sum()))
    if packed:
        ends = np.cumsum(lengths)
        batches, start = [], 0
        while start < n:
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + tokens_per_batch, side="right")))
            batches.append((start, stop - start, 0, base))
            start = stop
        return Chunk(n, order, lengths, flat, batches)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
    parts, batches, offset = [], [], 0
    for start, stop, width in length_bands(lengths, tokens_per_batch, band_slack):
        columns = np.arange(width)
        inside = columns[None, :] < lengths[start:stop, None]
        index = np.minimum(starts[start:stop, None] + columns[None, :], max(len(flat) - 1, 0))
        parts.append(np.where(inside, flat[index], 0).astype(np.int32, copy=False).ravel())
        batches.append((start, stop - start, width, offset))
        offset += (stop - start) * width
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    chunk = Chunk(n, order, lengths, tokens, batches)
    if pin_memory:
        chunk.tokens = torch.from_numpy(tokens).pin_memory()
        chunk.lengths = torch.from_numpy(lengths).pin_memory()
        chunk.order = torch.from_numpy(order).pin_memory()
    return chunk


# -- running a chunk ---------------------------------------------------------------------------------------


def run_packed(chunk: Chunk, kernel: PackedBert, dimension: int) -> np.ndarray:
    """Unit vectors (chunk order) of a packed chunk, float32 on the CPU."""
    out = np.empty((chunk.size, dimension), dtype=np.float32)
    for start, rows, _, offset in chunk.batches:
        lengths = chunk.lengths[start : start + rows]
        tokens = chunk.tokens[offset : offset + int(lengths.sum())]
        pooled = kernel.mean_pooled_flat(tokens, lengths)
        out[chunk.order[start : start + rows]] = F.normalize(pooled, dim=-1).numpy()
    return out


def run_bands(chunk: Chunk, forward: TokenForward, device: torch.device, dimension: int) -> torch.Tensor:
    """Unit vectors (chunk order) on the device: one copy in, every band batch, un-permuted on the device."""
    dev = device
    if not chunk.batches:
        return torch.empty((0, dimension), device=dev)
    blocking = dev.type != "cuda"
    tokens = torch.as_tensor(chunk.tokens).to(dev, non_blocking=not blocking)
    lengths = torch.as_tensor(chunk.lengths).to(dev, non_blocking=not blocking)
    columns = torch.arange(max(width for _, _, width, _ in chunk.batches), device=dev)
    pooled = torch.empty((chunk.size, dimension), device=dev, dtype=torch.float32)
    host_lengths = chunk.lengths.numpy() if isinstance(chunk.lengths, torch.Tensor) else chunk.lengths
    for start, rows, width, offset in chunk.batches:
        ids = tokens[offset : offset + rows * width].view(rows, width).long()
        row_lengths = lengths[start : start + rows]
        mask = columns[:width][None, :] < row_lengths[:, None]
        ragged = int(host_lengths[start]) != width  # all rows full length: no mask needed
        states = forward(ids, mask.long() if ragged else None)
        summed = (states.float() * mask[..., None]).sum(1) if ragged else states.float().sum(1)
        pooled[start : start + rows] = summed / row_lengths[:, None].float()
    out = torch.empty_like(pooled)
    out[torch.as_tensor(chunk.order).to(dev, non_blocking=not blocking)] = F.normalize(pooled, dim=-1)
    return out
