"""Template: TreeKVCache inside an inference engine.

A production-style wrapper (:class:`TreeCacheEngine`) that an engine's scheduler and
model runner would call, and a small simulated serving loop driving it (random q/k/v
stand in for the model). What the wrapper adds around the cache:

* one configuration object (:class:`EngineConfig`), validated up front;
* a start-up probe of the requested kernel backend on the real shapes, with a logged
  fallback to the torch backend when the Triton kernels cannot run (no compiler, an
  unsupported GPU, a kernel error);
* sequences named by the engine's own ids, sharing a pinned system prompt by ``fork``;
* admission that never half-admits: ``OutOfPagesError`` leaves the cache unchanged, so a
  sequence that does not fit simply waits;
* preemption: when a decode step runs out of pages, the most recently admitted running
  sequence is pruned (its private pages return to the pool), queued for recomputation,
  and the step is retried without it;
* input validation before any state changes, and an abort path for a step that fails
  half-way (its reserved slots hold no valid K/V, so its sequences are dropped);
* ``logging`` for every decision, ``stats()`` for metrics.

Run:
    python examples/08_integration_template.py                 # GPU if there is one, else CPU
    python examples/08_integration_template.py --steps 200 --capacity 4096 -v
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
from collections import deque

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from kernels import reference_decode
from treecache import OutOfPagesError, TreeCacheError, TreeKVCache

logger = logging.getLogger("engine")


# ============================================================================ configuration


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to size and run the cache."""

    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    capacity_tokens: int
    page_size: int = 1
    dtype: torch.dtype = torch.float16
    device: str = "cuda"
    backend: str = "auto"          # "auto", "triton" or "torch"
    plan_headroom: int = 64        # append-only steps between re-plans
    max_preemptions_per_step: int = 16

    def validate(self) -> None:
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_qo_heads {self.num_qo_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.capacity_tokens < self.page_size:
            raise ValueError(f"capacity_tokens {self.capacity_tokens} is below one page "
                             f"({self.page_size})")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")


class EngineError(RuntimeError):
    """A caller error at the engine level (unknown sequence id, bad input)."""


@dataclasses.dataclass
class Step:
    """One decode step in progress: the sequences in it and their new token slots."""

    seq_ids: list[str]
    requests: list[int]
    slots: torch.Tensor
    preempted: list[str]
    layers_done: int = 0


# ============================================================================ the wrapper


class TreeCacheEngine:
    """TreeKVCache plus admission, preemption, validation and a backend fallback.

    Typical use by a model runner, once per decode step::

        step = engine.begin_step(running_ids)        # may preempt; see step.preempted
        for layer in range(num_layers):
            q, k, v = model.layer_qkv(layer, ...)    # [len(step.seq_ids), H, D]
            o = engine.attend(step, layer, q, k, v)  # write + attend
    """

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        backend = self._probe_backend(config)
        self.cache = TreeKVCache(
            config.num_layers, config.num_qo_heads, config.num_kv_heads, config.head_dim,
            config.capacity_tokens, page_size=config.page_size, dtype=config.dtype,
            device=config.device, backend=backend, plan_headroom=config.plan_headroom)
        self.backend = self.cache.backend.value
        self._req: dict[str, int] = {}       # sequence id -> cache request id
        self._admitted: list[str] = []       # admission order (preemption picks the last)
        self._pinned: set[str] = set()
        self.recompute_queue: deque[tuple[str, int]] = deque()  # (seq id, tokens to redo)
        self.preemptions = 0
        logger.info("engine ready: %d layers, %d/%d heads x %d, %d token slots, backend %s",
                    config.num_layers, config.num_qo_heads, config.num_kv_heads,
                    config.head_dim, self.cache.pool.num_slots, self.backend)

    # ------------------------------------------------------------------ start-up

    @staticmethod
    def _probe_backend(cfg: EngineConfig) -> str:
        """Run the requested backend once on the real shapes; fall back to torch if it fails
        or disagrees with the torch backend."""
        if cfg.backend == "torch":
            return "torch"
        shape = (cfg.num_layers, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim)
        try:
            outs = []
            for backend in (cfg.backend, "torch"):
                probe = TreeKVCache(*shape, 64, dtype=cfg.dtype, device=cfg.device,
                                    backend=backend)
                gen = torch.Generator().manual_seed(0)
                kv = torch.randn(2, cfg.num_layers, 8, cfg.num_kv_heads, cfg.head_dim,
                                 generator=gen).to(device=cfg.device, dtype=cfg.dtype)
                r = probe.new_request()
                probe.append(r, kv[0], kv[1])
                probe.fork(r)
                q = torch.randn(2, cfg.num_qo_heads, cfg.head_dim,
                                generator=gen).to(device=cfg.device, dtype=cfg.dtype)
                outs.append(probe.attend(q, 0).float())
            if not torch.allclose(outs[0], outs[1], atol=2e-2, rtol=2e-2):
                raise RuntimeError("kernel output disagrees with the torch backend")
            return cfg.backend
        except Exception as exc:  # any kernel failure: compile errors, driver errors, ...
            logger.warning("backend %r failed its start-up probe (%s: %s); using the torch "
                           "backend", cfg.backend, type(exc).__name__, exc)
            return "torch"

    # ------------------------------------------------------------------ sequences

    def add_sequence(self, seq_id: str, k: torch.Tensor, v: torch.Tensor, *,
                     parent: str | None = None, pinned: bool = False) -> bool:
        """Admit a sequence with prompt K/V ``[num_layers, n, Hk, D]`` (after ``parent``'s
        tokens when given). Returns False, changing nothing, if the pool cannot hold it."""
        if seq_id in self._req:
            raise EngineError(f"sequence {seq_id!r} already exists")
        self._check_kv(k, v, k.shape[1] if k.dim() == 4 else -1, "prompt")
        req = self.cache.fork(self._request(parent)) if parent else self.cache.new_request()
        try:
            self.cache.append(req, k, v)
        except OutOfPagesError as exc:
            self.cache.prune(req)  # the empty request (or fork) costs no pages
            logger.debug("admission of %s deferred: %s", seq_id, exc)
            return False
        self._req[seq_id] = req
        self._admitted.append(seq_id)
        if pinned:
            self._pinned.add(seq_id)
        logger.debug("admitted %s (%d tokens, parent %s)", seq_id, self.cache.length(req), parent)
        return True

    def fork_sequence(self, parent: str, child: str) -> None:
        """A new sequence sharing all of ``parent``'s tokens (no KV copied)."""
        if child in self._req:
            raise EngineError(f"sequence {child!r} already exists")
        self._req[child] = self.cache.fork(self._request(parent))
        self._admitted.append(child)

    def finish(self, seq_id: str) -> None:
        """Release a finished sequence; pages nobody else reads go back to the pool."""
        self.cache.prune(self._request(seq_id))
        del self._req[seq_id]
        self._admitted.remove(seq_id)
        self._pinned.discard(seq_id)

    def length(self, seq_id: str) -> int:
        return self.cache.length(self._request(seq_id))

    # ------------------------------------------------------------------ decode

    def begin_step(self, seq_ids: list[str]) -> Step:
        """Reserve one slot per sequence, preempting (most recent first) until it fits."""
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise EngineError("begin_step lists a sequence twice")
        for s in seq_ids:
            self._request(s)
        preempted: list[str] = []
        while True:
            reqs = [self._req[s] for s in seq_ids]
            try:
                slots = self.cache.reserve(reqs)
                return Step(seq_ids, reqs, slots, preempted)
            except OutOfPagesError as exc:
                victim = self._pick_victim(seq_ids)
                if victim is None or len(preempted) >= self.config.max_preemptions_per_step:
                    raise EngineError(f"cannot fit a decode step of {len(seq_ids)} sequences "
                                      f"({exc}); the pool is too small") from exc
                self._preempt(victim)
                preempted.append(victim)
                if victim in seq_ids:
                    seq_ids.remove(victim)

    def attend(self, step: Step, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Write the step's new K/V ``[B, Hk, D]`` of ``layer`` and attend with q ``[B, Hq, D]``."""
        try:
            if layer != step.layers_done:
                raise EngineError(f"layer {layer} out of order, expected {step.layers_done}")
            b = len(step.seq_ids)
            self._check_kv(k[None], v[None], b, f"layer {layer}", layers=1)
            want_q = (b, self.config.num_qo_heads, self.config.head_dim)
            if tuple(q.shape) != want_q:
                raise EngineError(f"q has shape {tuple(q.shape)}, expected {want_q}")
            self.cache.write(layer, step.slots, k, v)
            out = self.cache.attend(q, layer, step.requests)
        except (EngineError, TreeCacheError):
            self.abort_step(step)
            raise
        step.layers_done += 1
        return out

    def abort_step(self, step: Step) -> None:
        """Drop every sequence of a step that failed half-way: its reserved slots hold
        K/V for some layers only. The sequences are queued for recomputation."""
        logger.error("aborting a decode step at layer %d: %d sequences dropped",
                     step.layers_done, len(step.seq_ids))
        for s in step.seq_ids:
            if s in self._req:
                self._preempt(s)

    # ------------------------------------------------------------------ metrics

    def stats(self) -> dict:
        s = self.cache.stats()
        s.update(sequences=len(self._req), preemptions=self.preemptions,
                 recompute_queue=len(self.recompute_queue))
        return s

    # ------------------------------------------------------------------ helpers

    def _request(self, seq_id: str) -> int:
        try:
            return self._req[seq_id]
        except KeyError:
            raise EngineError(f"unknown sequence {seq_id!r} (never added, or finished)") from None

    def _check_kv(self, k, v, n, what, layers=None) -> None:
        cfg = self.config
        want = (cfg.num_layers if layers is None else layers, n, cfg.num_kv_heads, cfg.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise EngineError(f"{what}: {name} has shape {got}, expected {want}")
            if t.dtype != cfg.dtype:
                raise EngineError(f"{what}: {name} has dtype {t.dtype}, expected {cfg.dtype}")

    def _pick_victim(self, running: list[str]) -> str | None:
        for s in reversed(self._admitted):
            if s not in self._pinned and s in running:
                return s
        return None

    def _preempt(self, seq_id: str) -> None:
        n = self.length(seq_id)
        self.finish(seq_id)
        self.recompute_queue.append((seq_id, n))
        self.preemptions += 1
        logger.info("preempted %s (%d tokens queued for recomputation); %d pages free",
                    seq_id, n, self.cache.stats()["pages_free"])


# ============================================================================ simulation


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--capacity", type=int, default=1200, help="KV token slots")
    ap.add_argument("--page_size", type=int, default=4)
    ap.add_argument("--system_prompt", type=int, default=128)
    ap.add_argument("--arrivals", type=float, default=0.8, help="new sequences per step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("-v", "--verbose", action="store_true", help="log every engine decision")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    on_gpu = args.device.startswith("cuda")
    cfg = EngineConfig(num_layers=4 if on_gpu else 2, num_qo_heads=32 if on_gpu else 8,
                       num_kv_heads=8 if on_gpu else 2, head_dim=128 if on_gpu else 64,
                       capacity_tokens=args.capacity, page_size=args.page_size,
                       dtype=torch.float16 if on_gpu else torch.float32, device=args.device,
                       backend=args.backend)
    engine = TreeCacheEngine(cfg)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):  # random tensors stand in for the model's q/k/v
        return torch.randn(*shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)

    def prompt_kv(n):
        return rand(cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim), \
            rand(cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim)

    # A shared system prompt, pinned: every sequence forks it.
    assert engine.add_sequence("system", *prompt_kv(args.system_prompt), pinned=True)
    waiting: deque[tuple[str, int]] = deque()  # (seq id, prompt tokens)
    budget: dict[str, int] = {}                # tokens left to generate
    running: list[str] = []
    done = next_id = decoded = 0
    max_err = 0.0
    print(f"device {cfg.device}, backend {engine.backend}, capacity {args.capacity} tokens "
          f"(page_size {cfg.page_size}), system prompt {args.system_prompt} tokens\n")
    print(" step  running  waiting  done  preempted  pages used/free  sharing  rebuilds")
    for step_no in range(args.steps):
        for _ in range(int(torch.poisson(torch.tensor(args.arrivals), generator=gen))):
            sid = f"seq{next_id}"
            next_id += 1
            waiting.append((sid, int(torch.randint(16, 64, (1,), generator=gen))))
            budget[sid] = int(torch.randint(8, 48, (1,), generator=gen))
        # Admission: stop at the first sequence that does not fit (first come, first served).
        while waiting:
            sid, n = waiting[0]
            if not engine.add_sequence(sid, *prompt_kv(n), parent="system"):
                break
            waiting.popleft()
            running.append(sid)
        if not running:
            continue

        # One decode step over every running sequence.
        step = engine.begin_step(running)
        # Preempted sequences wait first in line, to be recomputed from their tokens
        # (here: random K/V for all of them, past the shared system prompt).
        while engine.recompute_queue:
            sid, n = engine.recompute_queue.pop()
            running.remove(sid)
            waiting.appendleft((sid, n - args.system_prompt))
        b = len(step.seq_ids)
        for layer in range(cfg.num_layers):
            q = rand(b, cfg.num_qo_heads, cfg.head_dim)
            o = engine.attend(step, layer, q, rand(b, cfg.num_kv_heads, cfg.head_dim),
                              rand(b, cfg.num_kv_heads, cfg.head_dim))
            if decoded % 10 == 0 and layer == 0:  # spot check against the reference
                c = engine.cache
                ref = reference_decode(q, c.k_pool[0], c.v_pool[0],
                                       [torch.from_numpy(c.slots(r)).to(q.device)
                                        for r in step.requests], c.sm_scale)
                max_err = max(max_err, (o.float() - ref).abs().max().item())
        decoded += 1
        for sid in step.seq_ids:
            budget[sid] -= 1
            if budget[sid] == 0:
                engine.finish(sid)
                running.remove(sid)
                done += 1

        s = engine.stats()
        print(f"{step_no:5d}  {len(running):7d}  {len(waiting):7d}  {done:4d}  "
              f"{s['preemptions']:9d}  {s['pages_used']:7d}/{s['pages_free']:<7d}  "
              f"{s['sharing_ratio']:7.2f}  {s['plan_rebuilds']:8d}")

    engine.cache.check()
    for sid in list(running):
        engine.finish(sid)
    engine.finish("system")
    s = engine.stats()
    print(f"\n{done} sequences finished, {s['preemptions']} preemptions; after releasing "
          f"everything: {s['pages_used']} pages used")
    tol = 1e-3 if cfg.dtype == torch.float32 else 2e-2
    print(f"max |attend - reference| at spot checks: {max_err:.2e}")
    try:
        engine.begin_step(["no-such-sequence"])
    except EngineError as exc:
        print(f"validation example: {exc}")
    ok = s["pages_used"] == 0 and max_err < tol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
