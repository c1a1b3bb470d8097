"""The sampler's decode step: one new token per row through the model's own forward.

``decode="eager"`` runs :func:`step_logits` as it is; ``decode="compiled"`` runs it through
``torch.compile``, as gpt-fast compiles its ``decode_one_token``:

* on CUDA with CUDA graphs (inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"``
  sets): a step is one graph replay instead of hundreds of kernel launches from Python, and has no
  host syncs. A graph bakes in the addresses it reads and writes, so the sampler decodes in one
  :class:`StaticKVCache` per model (gpt-fast's static cache): it copies the decode batch's cache
  rows in, decodes, and copies what was decoded back. Rows are padded to :func:`graph_rows` and
  the KV length to a multiple of ``r3.model.KV_BUCKET`` slots: one graph is recorded for each
  (padded rows, KV bucket), once per process, and replayed by every later rollout. Dynamo's
  guards, checked on the host before each replay, are cut to those on tensors, shapes and the
  values the step read (:func:`_tensor_and_state_guards`). With the pick fused (greedy, or
  sampling without top-k / top-p) the sampler goes further: :class:`GraphRuns` records
  :data:`GRAPH_RUN_STEPS` whole steps, bookkeeping included, as one CUDA graph of its own, and
  replays it once per that many tokens, with no guard check or Python per step.
* on CPU with inductor, which fuses each layer's small elementwise ops (RMSNorm, RoPE, cache
  writes, SiLU, residuals) into a few C++ loops; ``emulate_precision_casts`` rounds
  intermediates to the model dtype where eager does.

With no top-k/top-p, the sampler's next-token pick is fused into the same graph. Batch size and
KV length are dynamic dimensions of one compiled graph (compiled once per process, ~50-80 s for
the built-in model on 2 CPU cores; a batch of exactly one row is specialised once more; with CUDA
graphs, once per shape of the static cache, which rarely grows, and graph runs compile a function
of their own per pick and cache shape). Each
model has compiled functions of its own (the model is their argument, not a closure variable, so
they keep no model alive), and so its own recompile budget; its packed slots are constants of
its graphs.

Not yet run on a GPU: the CUDA-graph form is tested on CPU (where inductor leaves the graphs
out), and ``benchmarks/gpu_check.py`` measures it where a GPU is lent.

On CPU (fp32, and bf16 where oneDNN runs it natively) both modes run the model's matmuls on
prepacked weights (:mod:`r3.packed_linear`): a matmul backend, not a second copy of the model's math.
"""

from __future__ import annotations

import contextlib
import types
import weakref

import torch
import torch.nn.functional as F

from r3.model import KV_BUCKET, KVCache, kv_bucket_ceil
from r3.packed_linear import PackedWeights

DECODE_MODES = ("eager", "compiled")

#: Whether the compiled step uses CUDA graphs: None means on CUDA devices. (Tests set it True on
#: CPU, where inductor leaves the graphs out but everything around them runs.)
CUDA_GRAPHS: bool | None = None


#: Decode steps per CUDA graph where the sampler's pick is fused into the step (greedy, or sampling
#: without top-k / top-p): one replay per this many tokens (:class:`GraphRuns`). 0 or 1: one replay
#: per step through inductor's cudagraph trees, as top-k / top-p decoding always runs. Must divide
#: KV_BUCKET (a run reads one KV bucket).
GRAPH_RUN_STEPS = 8


def step_logits(model, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len, vocab_size: int,
                live: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, vocab_size]`` of one token per row (``tok``/``pos``: ``[B]``); writes each
    row's keys/values at ``pos`` and attends to its slots ``< kv_len`` (``live``: the rows whose
    Gated DeltaNet states take the token, Qwen 3.5's; None: all)."""
    h = model.hidden_states(tok[:, None], positions=pos[:, None], cache=cache, kv_len=kv_len, live=live)
    logits = model.logits(h[:, 0])
    return logits[:, :vocab_size] if vocab_size < logits.shape[-1] else logits


# model -> {(vocab_size, pick, cuda, static cache shape or None, lean guards): compiled function,
# ("step_in_place", vocab_size, pick, lean guards, static cache shape): graph runs' compiled step}.
# The model is the functions' argument, not a closure variable: they hold no model alive (the
# dictionary holds models weakly).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: The guards a step compiled with ``lean_guards`` keeps (see :func:`_tensor_and_state_guards`).
KEPT_GUARDS = frozenset({
    "TENSOR_MATCH", "DUPLICATE_INPUT", "SHAPE_ENV",  # tensors (and, from their matches, aliasing) and shapes
    "CONSTANT_MATCH", "EQUALS_MATCH",  # Python values the step read (a norm's eps, a window size)
    "DICT_CONTAINS",  # a cached tensor the step found, or made (the model's rotary frequencies per device)
    "GLOBAL_STATE", "GRAD_MODE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE", "DETERMINISTIC_ALGORITHMS",
    "AUTOGRAD_SAVED_TENSORS_HOOKS", "EMPTY_NN_MODULE_HOOKS_DICT",
})


def _tensor_and_state_guards(entries) -> list[bool]:
    """Dynamo's guard filter for the CUDA-graph step. Kept: the guards on tensors (each input's
    and parameter's dtype, device, shape, strides, requires_grad, and which alias), shape
    relations, the Python values the step read from the model (a changed eps compiles it again)
    and the global state. Dropped: the guards on the model's structure (the type of every module
    and object it went through, that no instance overrides its class's ``forward``, closures,
    list lengths): r3 never swaps a module or a method after loading, and each model has compiled
    functions of its own. On a 28-layer model that is about half the guards and half the guard
    check's time, which the host spends before every step; at small batches a CUDA-graph step's
    device work is short (Qwen2.5-1.5B at B = 1: ~0.75 ms of weight reads on an H200), and the
    host must issue each step in less."""
    return [e.guard_type in KEPT_GUARDS for e in entries]


def _compile(vocab_size: int, pick, cuda: bool, lean_guards: bool = False):
    """``run(model, tok, pos, ks, vs, conv, ssm, slots, live, u, temperature)`` through
    torch.compile: the logits, or ``pick(logits, u, temperature)`` in the same graph when ``pick``
    is given. ``slots``:
    ``arange(kv_len)`` (a tensor, so that kv_len is a dynamic size, not a constant). ``ks``/``vs``
    may hold more rows than ``tok`` (a :class:`StaticKVCache`'s): the step runs in their first
    ``len(tok)`` rows (the model writes rows ``arange(len(tok))`` and reads ``[:len(tok)]``; a
    slice taken before the write would make inductor copy the cache out and back at every step).
    ``conv``/``ssm``: Qwen 3.5's Gated DeltaNet states (empty lists for other models), updated in
    place in their first ``len(tok)`` rows, those of the ``live`` rows only (None: all).
    ``lean_guards``: keep only :func:`_tensor_and_state_guards`."""

    def logits(model, tok, pos, ks, vs, conv, ssm, slots, live):
        return step_logits(model, tok, pos, KVCache(ks, vs, conv, ssm), slots.shape[0], vocab_size, live=live)

    # Two functions, so the two kinds of graph do not share one code object's recompile budget.
    if pick is None:
        def run(model, tok, pos, ks, vs, conv, ssm, slots, live, u, temperature):
            return logits(model, tok, pos, ks, vs, conv, ssm, slots, live)
    else:
        def run_and_pick(model, tok, pos, ks, vs, conv, ssm, slots, live, u, temperature):
            return pick(logits(model, tok, pos, ks, vs, conv, ssm, slots, live), u, temperature)
        run = run_and_pick
    return _torch_compile(run, cuda, lean_guards)


def _torch_compile(fn, cudagraphs: bool, lean_guards: bool):
    """``fn`` through torch.compile with the decode step's options: inductor's CUDA graphs
    (``cudagraphs``), :func:`_tensor_and_state_guards` (``lean_guards``)."""
    # A code object of its own: dynamo keeps compiled graphs, and counts recompiles against its
    # limit (8), per code object; shared by every model and vocabulary, the budget would run out
    # (a model of another dtype, a batch of one, greedy and sampled picks) and the step would
    # fall back to eager.
    fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    options = {"emulate_precision_casts": True}
    if cudagraphs:
        # mode="reduce-overhead", plus: no warning for the one graph per (batch, KV bucket) shape.
        options.update({"triton.cudagraphs": True, "triton.cudagraph_dynamic_shape_warn_limit": None})
    if lean_guards and hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # (torch >= 2.8)
        options["guard_filter_fn"] = _tensor_and_state_guards
    # Static shapes except those marked dynamic (rows, cache slots, kv_len): with everything
    # dynamic, head counts and sizes would become symbols and the fused loops much slower.
    return torch.compile(fn, dynamic=None, options=options)


def _compile_step_in_place(vocab_size: int, pick, lean_guards: bool):
    """``step_in_place(model, tok, pos, done, is_stop, ks, vs, conv, ssm, slots, u, temperature,
    out_tok, out_lp)`` through torch.compile, without inductor's CUDA graphs (:class:`GraphRuns` records its own):
    one decode step with ``pick`` fused, as :func:`_compile`'s, and the sampler's bookkeeping of
    that step, in place: a stopped row (``done``) repeats its token at its frozen position with
    log-prob 0; ``out_tok``/``out_lp`` get the step's tokens and log-probs; ``tok`` the next
    tokens, ``pos`` advances for the rows that had not stopped, ``done`` adds the rows whose token
    is a stop id (``is_stop[token]``); a stopped row's Gated DeltaNet states (``conv``/``ssm``,
    Qwen 3.5's) stay as they are. It must be one graph: a graph break would put Python
    between its pieces, which a CUDA graph does not replay (tests check every architecture; not
    ``fullgraph``, which raises where dynamo skips the frame, e.g. under a dispatch mode)."""

    def step_in_place(model, tok, pos, done, is_stop, ks, vs, conv, ssm, slots, u, temperature, out_tok, out_lp):
        live = ~done if ssm else None
        logits = step_logits(model, tok, pos, KVCache(ks, vs, conv, ssm), slots.shape[0], vocab_size, live=live)
        nxt, lp = pick(logits, u, temperature)
        nxt = torch.where(done, tok, nxt)
        out_tok.copy_(nxt)
        out_lp.copy_(lp.masked_fill(done, 0.0))
        pos.add_((~done).long())
        done.logical_or_(is_stop[nxt])
        tok.copy_(nxt)

    return _torch_compile(step_in_place, False, lean_guards)


def uses_cuda_graphs(mode: str, device, cuda_graphs: bool | None = None) -> bool:
    """Whether a decode step of this mode replays CUDA graphs on ``device`` (``cuda_graphs``:
    forced on or off; default :data:`CUDA_GRAPHS`, which by default means on CUDA devices)."""
    if mode != "compiled":
        return False
    flag = CUDA_GRAPHS if cuda_graphs is None else cuda_graphs
    return torch.device(device).type == "cuda" if flag is None else flag


def slots_with_margin(slots: int) -> int:
    """``slots`` rounded up to a multiple of ``KV_BUCKET``, plus one bucket: a cache this long is
    never read whole by a step (the KV length read is rounded up to the bucket), which keeps a
    compiled step one graph (reading every slot, the cache's slice is contiguous, and dynamo
    compiles that case again)."""
    return kv_bucket_ceil(slots) + KV_BUCKET


def graph_rows(n: int) -> int:
    """The rows a decode batch of ``n`` rows runs at with CUDA graphs: 2, 4, then multiples of 8
    (at most 7 padding rows). A batch of one runs as two: a size-1 dimension would be compiled
    again as a constant."""
    return 2 if n <= 2 else 4 if n <= 4 else -(-n // 8) * 8


class StaticKVCache:
    """The KV cache the CUDA-graph decode step always runs in, one per model.

    A CUDA graph replays the addresses it was recorded with. Recorded against each session's own
    cache, the step would be recorded again for every new cache (each rollout, fork and
    compaction), and cudagraph trees keep every recording without counting it against a limit:
    graphs, their memory and the time to find the matching one would grow for as long as training
    runs. So :meth:`r3.sampler.Session.sample` copies the decode batch's rows in here (rows
    ``[0, n)``), decodes, and writes what was decoded back; the step pads the batch to
    :func:`graph_rows` with rows that attend only to their own slot 0. It always shows the compiled
    step all of its slots, so a graph's shape is (padded rows, KV bucket) and the first rollout's
    graphs serve every later one. The graphs of a training run are at most (padded row counts) x
    (KV buckets) per pick function, e.g. 32 x 13 for 256 rows of 896 slots (the last bucket is
    never read), each recorded once (a warm-up and a capture) as compactions first reach it;
    graph runs (:class:`GraphRuns`) record twice as many in a pool of their own (runs of one step
    and of ``GRAPH_RUN_STEPS``).

    It holds one bucket more than asked for (:func:`slots_with_margin`), and grows when a request
    needs more rows or slots (by at least a quarter, slots in multiples of ``KV_BUCKET``; sessions
    presized for a whole conversation, as episodes are, seldom make it grow); the step is then
    compiled once more for its new shape (see :func:`_compile`) and its graphs recorded once more.
    Memory: one decode batch's KV cache, held from the
    first CUDA-graph decode for as long as the model lives, or until :func:`release_static_cache`.
    """

    def __init__(self):
        self.full: KVCache | None = None
        self._rows: dict[int, KVCache] = {}  # n -> views of rows [0, n)
        self.runs: GraphRuns | None = None  # the graph runs recorded against this cache

    def reserve(self, cfg, rows: int, slots: int, dtype, device) -> None:
        """Room for ``rows`` rows (padded: :func:`graph_rows`) of ``slots`` slots, in this dtype on
        this device (a new cache otherwise)."""
        rows, device = graph_rows(rows), torch.device(device)
        full = self.full
        if full is not None and (full.k[0].dtype != dtype or full.k[0].device.type != device.type
                                 or device.index not in (None, full.k[0].device.index)):
            full = None
        slots = slots_with_margin(slots)
        if full is not None and rows <= full.batch_size and slots <= full.max_len:
            return
        if full is not None:  # grow by at least a quarter: few re-recordings while sizes creep up
            rows = max(rows, graph_rows(-(-5 * full.batch_size // 4)), full.batch_size)
            slots = max(slots, -(-5 * full.max_len // 4), full.max_len)
        slots = kv_bucket_ceil(slots)
        self.full, self._rows, self.runs = None, {}, None  # (the old one, and its graphs, freed first)
        self.full = KVCache.empty(cfg, rows, slots, dtype, device)
        for t in self.full.k + self.full.v + self.full.states:  # (the compiled step writes into them in place)
            torch._dynamo.mark_static_address(t, guard=False)

    def graph_runs(self) -> "GraphRuns":
        """The :class:`GraphRuns` recorded against this cache, of :data:`GRAPH_RUN_STEPS` steps
        (made on first use, and again if that changed)."""
        if self.runs is None or self.runs.run_steps != GRAPH_RUN_STEPS:
            self.runs = None  # (the old one's graphs are freed first)
            self.runs = GraphRuns(self.full, GRAPH_RUN_STEPS)
        return self.runs

    def holds(self, cache: KVCache) -> bool:
        """Whether ``cache`` is rows ``[0, n)`` of this one (what :meth:`rows` returns)."""
        return (self.full is not None and cache.k[0].data_ptr() == self.full.k[0].data_ptr()
                and cache.max_len == self.full.max_len)

    def rows(self, n: int) -> KVCache:
        """Rows ``[0, n)``, every slot (views: writes go here)."""
        view = self._rows.get(n)
        if view is None:
            if not 0 < n <= self.full.batch_size:
                raise ValueError(f"StaticKVCache holds {self.full.batch_size} rows, asked for {n}")
            view = self._rows[n] = self.full.rows_view(0, n)
        return view

    def copy_in(self, cache: KVCache, slots: int) -> KVCache:
        """Copy slots ``[0, slots)`` of every row of ``cache`` (and its Gated DeltaNet states) into
        rows ``[0, B)``; returns them."""
        dst = self.rows(cache.batch_size)
        if slots > 0:
            for d, s in zip(dst.k + dst.v, cache.k + cache.v):
                d[:, :, :slots].copy_(s[:, :, :slots])
        for d, s in zip(dst.states, cache.states):
            d.copy_(s)
        return dst

    def keep_rows(self, keep: torch.Tensor, slots: int) -> KVCache:
        """Move rows ``keep`` (ascending) to rows ``[0, len(keep))``, slots ``[0, slots)`` and their
        states; returns them."""
        dst = self.rows(len(keep))
        for d, s in zip(dst.k + dst.v, self.full.k + self.full.v):
            d[:, :, :slots].copy_(s[:, :, :slots].index_select(0, keep))
        for d, s in zip(dst.states, self.full.states):
            d.copy_(s.index_select(0, keep))
        return dst


class GraphRuns:
    """Decode runs of ``k`` steps, each run one CUDA graph, in a :class:`StaticKVCache`.

    Per step, cudagraph trees leave the host a guard check, their replay path (checks of the
    static inputs' addresses, copies of the others) and the sampler's dozen eager ops around it;
    at small batches that can take longer than the step's device work (Qwen2.5-1.5B at B = 1:
    ~0.75 ms of weight reads on an H200). Here a graph holds ``k`` whole steps: the compiled step
    with the pick and the stopped rows' bookkeeping (:func:`_compile_step_in_place`), its tokens and
    log-probs written to a ring. The sampler replays one graph per ``k`` tokens
    (:data:`GRAPH_RUN_STEPS`), reads the ring, and checks for stops between runs.

    The state the graphs read and write is theirs, sized for the static cache's rows: tokens,
    positions, stop flags (padding rows: token 0 at position 0, stopped), the stop table, the
    temperature, a run's uniforms, the ring. A graph is recorded for each (vocabulary, pick,
    padded rows, KV bucket, k) the first time it is needed: run once uncaptured (compiling and
    autotuning; on CUDA on the stream the captures use) with every row stopped, the state put back,
    then captured into one memory pool that all of them share (they never run at once). Stopped,
    the rows write only the cache slot of their pending token (which the run writes first) and
    feed no Gated DeltaNet state (Qwen 3.5's), so running it once changes nothing that is read. A
    run of ``k`` steps starts at a multiple of ``k``, so its steps read one KV bucket (``k``
    divides ``KV_BUCKET``); steps before and after it run as one-step graphs.

    A graph replays the addresses it was recorded with: :meth:`start` checks the model's
    parameters' addresses (an optimizer that updates them in place keeps the graphs; new tensors
    drop them). It also replays the Python values the step read when it was recorded: a model
    attribute changed afterwards (a norm's eps; r3 changes none) is seen only after
    :func:`release_static_cache`. On CPU, where tests force CUDA graphs, a recording is the steps
    run again (dynamo's guards checked at each).
    """

    def __init__(self, cache: KVCache, run_steps: int):
        if run_steps < 2 or KV_BUCKET % run_steps:
            raise ValueError(f"GraphRuns: run_steps must be > 1 and divide KV_BUCKET ({KV_BUCKET}), got {run_steps}")
        self.run_steps = run_steps
        rows, device = cache.batch_size, cache.k[0].device
        self.ks, self.vs, self.conv, self.ssm = cache.k, cache.v, cache.conv, cache.ssm
        self.cuda = device.type == "cuda"
        # (the ring's and the uniforms' rows start 64-byte aligned: each step writes, or reads, one)
        cols = -(-rows // 16) * 16
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.uniforms = torch.zeros(self.run_steps, cols, 1, dtype=torch.float32, device=device)
        self.ring_tok = torch.zeros(self.run_steps, cols, dtype=torch.long, device=device)
        self.ring_lp = torch.zeros(self.run_steps, cols, dtype=torch.float32, device=device)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.slots = torch.arange(cache.max_len, device=device)
        self.is_stop: dict[int, torch.Tensor] = {}  # vocab_size -> [vocab_size] bool
        self.graphs: dict[tuple, object] = {}  # (vocab_size, pick, lean, rows, kv bucket, k) -> replay
        self.addresses = None  # the model's parameters' addresses the graphs were recorded with
        self.call = None  # this decode batch's (model, held weakly; vocab_size, pick, lean guards)
        # (one stream, on the cache's device, for every warm-up and capture: a stream keeps its own
        # cuBLAS workspaces)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.n = 0  # the decode batch's rows

    def start(self, model, tok: torch.Tensor, pos: torch.Tensor, is_stop: torch.Tensor, temperature: float, pick,
              lean_guards: bool):
        """A decode batch of ``len(tok)`` rows at these tokens and positions, none stopped, with
        this stop table (``is_stop[token]``, the vocabulary's size), temperature and pick, its step
        compiled with ``lean_guards`` or not; returns the state's views (tokens, positions, stop
        flags) that the runs advance in place."""
        addresses = [p.data_ptr() for p in model.parameters()] + [b.data_ptr() for b in model.buffers()]
        if addresses != self.addresses:
            self.graphs.clear()
            self.addresses = addresses
        n = len(tok)
        self.tok[:n].copy_(tok)
        self.pos[:n].copy_(pos)
        self.done[:n].zero_()
        table = self.is_stop.get(len(is_stop))
        if table is None:
            table = self.is_stop[len(is_stop)] = torch.zeros_like(is_stop)
        table.copy_(is_stop)
        self.temperature.fill_(float(temperature))
        self.call = weakref.ref(model), len(is_stop), pick, lean_guards
        return self._rows(n)

    def keep(self, keep: torch.Tensor):
        """Go on with rows ``keep`` (ascending) only, moved to the first rows (as
        :meth:`StaticKVCache.keep_rows` moves their cache); returns the state's new views."""
        for t in (self.tok, self.pos, self.done):
            t[:len(keep)].copy_(t.index_select(0, keep))
        return self._rows(len(keep))

    def _rows(self, n: int):
        rows = graph_rows(n)
        self.tok[n:rows].zero_()
        self.pos[n:rows].zero_()
        self.done[n:rows].fill_(True)
        self.n = n
        return self.tok[:n], self.pos[:n], self.done[:n]

    def run_length(self, position: int, steps_left: int) -> int:
        """The steps of the next run from ``position`` (the first step's): a whole run where one
        starts (a multiple of the run length) and fits, else one step."""
        return self.run_steps if position % self.run_steps == 0 and steps_left >= self.run_steps else 1

    def run(self, kv_len: int, k: int, u: torch.Tensor | None):
        """Decode ``k`` steps of the batch :meth:`start` began; ``kv_len``: the last step's KV
        length; ``u``: the uniforms ``[k, n]`` (None: greedy). Returns views of the steps' tokens
        and log-probs ``[n, k]``, valid until the next run."""
        n, rows = self.n, graph_rows(self.n)
        kv = min(self.ks[0].shape[2], kv_bucket_ceil(kv_len))
        if u is not None:
            self.uniforms[:k, :n, 0].copy_(u)
        model_ref, vocab_size, pick, lean_guards = self.call
        key = (vocab_size, pick, lean_guards, rows, kv, k)
        replay = self.graphs.get(key)
        if replay is None:
            replay = self.graphs[key] = self._record(model_ref, key)
        replay()
        return self.ring_tok[:k, :n].t(), self.ring_lp[:k, :n].t()

    def _record(self, model_ref, key):
        vocab_size, pick, lean, rows, kv, k = key
        model = model_ref()
        # A function of its own per cache shape, as DecodeStep's: the cache's shape stays static.
        fns = _COMPILED.setdefault(model, {})
        compiled_key = ("step_in_place", vocab_size, pick, lean, tuple(self.ks[0].shape))
        if compiled_key not in fns:
            model.inv_freq(self.tok.device)  # (made outside the graph: made inside, it would be compiled again)
            fns[compiled_key] = _compile_step_in_place(vocab_size, pick, lean)
        fn = fns[compiled_key]
        state = self.tok[:rows], self.pos[:rows], self.done[:rows]
        slots = self.slots[:kv]
        per_step = [(self.uniforms[i, :rows], self.ring_tok[i, :rows], self.ring_lp[i, :rows]) for i in range(k)]
        steps = [state + (self.is_stop[vocab_size], self.ks, self.vs, self.conv, self.ssm, slots, u, self.temperature,
                          out_tok, out_lp) for u, out_tok, out_lp in per_step]
        for t in (*state, slots, *(a for ts in per_step for a in ts)):
            torch._dynamo.maybe_mark_dynamic(t, 0)

        def body():  # (the graphs are the model's: they hold no model alive)
            m = model_ref()
            for args in steps:
                fn(m, *args)

        # (the warm-up runs with every row stopped: each step writes a row's token at its
        # position, the slot the run writes first, and no Gated DeltaNet state takes a token, so
        # nothing but the tokens, positions and stop flags needs putting back: no copy of the
        # states, which can be as large as the KV cache)
        saved = [t.clone() for t in state]
        self.done[:rows].fill_(True)
        self._warm_up(body)
        for t, s in zip(state, saved):
            t.copy_(s)
        return self._capture(body) if self.cuda else body

    def _warm_up(self, body) -> None:
        """``body`` run uncaptured; on CUDA on the stream the captures use, on the cache's device."""
        if not self.cuda:
            body()
            return
        device = self.tok.device
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                body()
            current.wait_stream(self.stream)

    def _capture(self, body):
        """``body`` captured as a CUDA graph on the cache's device; returns its replay."""
        graph = torch.cuda.CUDAGraph()
        # The capture's cuBLAS workspace is allocated in its pool and forgotten after it (as
        # cudagraph trees do): otherwise a graph would bake in a workspace that later eager work,
        # or a freed pool, owns. thread_local: CUDA work of another thread (a checkpoint being
        # written) does not invalidate the capture. A recompile inside a capture would run host
        # code the graph cannot replay: an error instead.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)
        with torch.cuda.device(self.tok.device):
            clear_workspaces()
            try:
                with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(
                        graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    body()
            finally:
                clear_workspaces()
        return graph.replay


def session_slots(mode: str, device, slots: int) -> int:
    """The slots to allocate for a session cache that must hold ``slots``: with a margin
    (:func:`slots_with_margin`) where the compiled step runs on the session's own cache (no CUDA
    graphs), as :class:`StaticKVCache` has one; otherwise exactly ``slots``."""
    if mode != "compiled" or uses_cuda_graphs(mode, device):
        return slots
    return slots_with_margin(slots)


# model -> its StaticKVCache (held weakly, as _COMPILED).
_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_cache(model) -> StaticKVCache:
    """The model's :class:`StaticKVCache` (made empty on first use)."""
    cache = _STATIC.get(model)
    if cache is None:
        cache = _STATIC[model] = StaticKVCache()
    return cache


def release_static_cache(model) -> None:
    """Free the model's static cache and its graph runs' recordings. The next CUDA-graph decode
    makes a new one at other addresses and records its graphs again (the old per-step recordings
    stay with cudagraph trees)."""
    _STATIC.pop(model, None)


def _mark(t: torch.Tensor, cuda: bool, slots: bool = True) -> None:
    """A cache tensor ``[B, n_kv, max_len, D]`` (``slots``; else a Gated DeltaNet state, rows
    first) for the compiler: rows and slots dynamic; with CUDA graphs, a static address (the step
    writes into it in place; no guard on the address)."""
    torch._dynamo.maybe_mark_dynamic(t, 0)
    if slots:
        torch._dynamo.maybe_mark_dynamic(t, 2)
    if cuda:
        torch._dynamo.mark_static_address(t, guard=False)


class DecodeStep:
    """``step(tok, pos, cache, kv_len, vocab_size)`` -> logits ``[B, vocab_size]``; compiled, it
    also takes ``pick=, u=, temperature=`` and returns ``pick(logits, u, temperature)``.

    Use it inside ``with step.active():`` (the prepacked matmuls are on there, on CPU); the
    weights must not change inside that block. Make a new one after they change (an optimizer
    step): it repacks them. The compiled step leaves LongRoPE's position limit to its caller
    (``Session.sample`` checks a whole request once: ``model.check_positions``).
    """

    def __init__(self, model, mode: str = "eager", cuda_graphs: bool | None = None):
        """``cuda_graphs``: compiled with CUDA graphs (default :data:`CUDA_GRAPHS`: on CUDA)."""
        if mode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
        self.model = model
        self.compiled = mode == "compiled"
        self.cuda_graphs = CUDA_GRAPHS if cuda_graphs is None else cuda_graphs
        self.packed = PackedWeights.get(model) if PackedWeights.available(model) else None
        self._fns: dict[tuple, object] = {}  # (vocab_size, pick, static shape) -> a compiled step
        self._cuda = None  # whether the steps replay CUDA graphs (set at the first step: its device)
        self._slots = None  # arange(at least the longest kv_len so far): slots is a view of it
        self._marked = None  # the cache whose tensors were last marked for the compiler (weakly:
        # the sampler frees a compacted copy before making the next)

    def uses_cuda_graphs(self, device) -> bool:
        """Whether steps on ``device`` replay CUDA graphs (and so should decode in the model's
        :class:`StaticKVCache`)."""
        return uses_cuda_graphs("compiled" if self.compiled else "eager", device, self.cuda_graphs)

    def lean_guards(self, device) -> bool:
        """Whether the steps keep only :func:`_tensor_and_state_guards`: with CUDA graphs the
        host's time per step counts; with prepacked weights (CPU) the model's Python attributes
        say which weights are current, and stay guarded."""
        return self.uses_cuda_graphs(device) and self.packed is None

    def active(self):
        return self.packed.active() if self.packed is not None else contextlib.nullcontext()

    def __call__(self, tok, pos, cache: KVCache, kv_len: int, vocab_size: int, *, pick=None, u=None,
                 temperature=None, live=None):
        """``live [B]``: the rows whose Gated DeltaNet states (Qwen 3.5's) take their token (None:
        all)."""
        if not self.compiled:
            if pick is not None:
                raise ValueError("DecodeStep: pick is fused only into the compiled step")
            return step_logits(self.model, tok, pos, cache, kv_len, vocab_size, live=live)
        if self._cuda is None:
            self._cuda = self.uses_cuda_graphs(tok.device)
        cuda = self._cuda
        n = tok.shape[0]
        static = _STATIC.get(self.model) if cuda else None
        in_static = static is not None and static.holds(cache)
        # In the static cache the step gets its whole tensors, of static shapes (tensors marked
        # dynamic bring symbolic-shape guards, two per layer, checked in Python at every step), and
        # a function of its own per cache shape, so that they stay static after the cache grows.
        shape = (static.full.batch_size, static.full.max_len) if in_static else None
        fn = self._fns.get((vocab_size, pick, shape))
        if fn is None:
            fns = _COMPILED.setdefault(self.model, {})
            lean = self.lean_guards(tok.device)
            key = (vocab_size, pick, cuda, shape, lean)
            if key not in fns:
                self.model.inv_freq(tok.device)  # (made outside the graph: made inside, it would be compiled again)
                fns[key] = _compile(vocab_size, pick, cuda, lean)
            fn = self._fns[(vocab_size, pick, shape)] = fns[key]
        # The bucket the eager forward would round kv_len up to (see Transformer.hidden_states).
        kv_len = min(cache.max_len, kv_bucket_ceil(kv_len))
        if self._slots is None or self._slots.shape[0] < kv_len:  # (a view per step: no kernel launch)
            self._slots = torch.arange(max(kv_len, 2 * (0 if self._slots is None else self._slots.shape[0])),
                                       device=tok.device)
        slots = self._slots[:kv_len]
        if in_static:
            # The step runs in the static cache's first rows, padded to graph_rows: token 0 at
            # position 0, so each padding row attends only to the slot it writes (and keeps its
            # Gated DeltaNet state).
            if graph_rows(n) != n:
                pad = graph_rows(n) - n
                tok, pos = F.pad(tok, (0, pad)), F.pad(pos, (0, pad))
                u = None if u is None else F.pad(u, (0, 0, 0, pad))
                live = None if live is None else torch.cat([live, live.new_zeros(pad)])
            cache = static.full
        for t in (tok, pos, slots, u, live):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if not in_static and (self._marked is None or self._marked() is not cache):  # a new cache:
            for t in cache.k + cache.v:  # mark it once
                _mark(t, cuda)
            for t in cache.states:
                _mark(t, cuda, slots=False)
            self._marked = weakref.ref(cache)
        args = (self.model, tok, pos, cache.k, cache.v, cache.conv, cache.ssm, slots, live, u, temperature)
        if not cuda:
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
        # The graph's outputs live in its memory pool and are overwritten by the next replay; the
        # padding rows' are dropped.
        return tuple(t[:n].clone() for t in out) if isinstance(out, tuple) else out[:n].clone()

