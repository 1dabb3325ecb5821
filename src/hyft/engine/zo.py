"""The perturbation engine: seeded random directions, perturbed forwards that never touch the stored
weights, in-place SPSA updates, and the (seed, coefficient) log that replays them.

How a perturbed forward works: a forward pre-hook on every module that owns ZO parameters swaps in a
temporary ``θ + scale·z`` for that module's own weights, and its forward hook swaps the stored Parameter
back. Temporaries are made a few modules ahead (up to ``LOOKAHEAD`` elements) and dropped once their
module has run. Embeddings and linear layers whose weight is tied (SmolLM2, GPT-2, OPT) or larger than
``LOOKAHEAD`` (untied vocabularies of Llama/Qwen/Mistral, wide MLPs) are never made whole: a lookup
builds only the perturbed rows it needs and a linear layer computes its output one block of rows at a
time, all from the same seed, so every use sees the same ``θ + scale·z`` and no temporary is larger
than one block. The stored weights are never written during the estimate, so a step with learning rate
0 leaves θ bitwise unchanged in every dtype, unlike MeZO's in-place +ε, −2ε, +ε sequence, which drifts
in low precision.

Directions: ``z`` for a parameter is a pure function (:mod:`hyft.engine.noise`) of a seed mixing the step seed
and a hash of the parameter's canonical name, and of the position, so it is regenerated identically for
the perturbation, the update and a later replay, whatever wrapping (peft) the model has and whatever
device replays it.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyft.engine import noise, shards, zmath
from hyft.errors import HyftError


def canonical_name(name: str) -> str:
    """A parameter's name in the unwrapped base model: without the prefixes of DDP (``module.``),
    ``torch.compile`` (``_orig_mod.``) and peft (``base_model.model.``, ``.base_layer``), so seeds and logs
    do not depend on how the model is wrapped."""
    while (bare := name.removeprefix("module.").removeprefix("_orig_mod.")) != name:
        name = bare
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def direction_seed(step_seed: int, name: str) -> int:
    return (step_seed * 0x9E3779B1 + zlib.crc32(canonical_name(name).encode())) % (2**63 - 1)


@dataclass
class ZOUpdate:
    """One logged update: θ ← θ − lr·(coef·z(seed) + weight_decay·θ).

    ``shifts``: the in-place perturbations θ ← θ + s·z(seed) of the step that made it (the fused hybrid
    step: +ε, −2ε, +ε), applied first, so that a replay repeats their rounding exactly.
    """

    step: int
    seed: int
    coef: float
    lr: float
    weight_decay: float = 0.0
    shifts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.shifts = tuple(self.shifts)  # JSON gives lists


LOOKAHEAD = 1 << 22  # CPU: elements of perturbed temporaries made in one batch (16 MiB in float32)
DEVICE_LOOKAHEAD = 1 << 26  # accelerators: fewer, larger batches (kernel launches, not cache, are the cost)


def lookahead(device: torch.device) -> int:
    """The temporaries budget on ``device``: the largest weight made whole, and the size of a row block."""
    return LOOKAHEAD if device.type == "cpu" else DEVICE_LOOKAHEAD


RESIDUAL = "#residual"


class EngineState:
    """What a snapshot of the base must hold, for any engine with ``params`` and ``residuals``."""

    params: list[tuple[str, nn.Parameter]]
    residuals: list[Tensor | None]

    def begin(self, step: int) -> None:
        """Called before a step's first forward (engines whose directions depend on the step use it)."""

    def materialize(self) -> None:
        """Put any pending update into the weights themselves (the dense and sparse engines keep none)."""

    def extra_tensors(self) -> dict[str, Tensor]:
        """State beyond the weights and residuals that a snapshot or checkpoint must keep (none here)."""
        return {}

    def load_extra_tensors(self, tensors: Callable[[str], Tensor | None]) -> None:
        """Set :meth:`extra_tensors` from ``tensors(name)`` (absent: the state of a fresh engine)."""

    def state_tensors(self) -> dict[str, Tensor]:
        """The ZO tensors by canonical name, with their residuals (``NAME#residual``) where kept, and any
        extra state (:meth:`extra_tensors`)."""
        out = {}
        for i, ((name, p), r) in enumerate(zip(self.params, self.whole_residuals(), strict=True)):
            out[canonical_name(name)] = self._on_host(i, shards.full(p.detach()))
            if r is not None:
                out[canonical_name(name) + RESIDUAL] = r
        return {**out, **self.extra_tensors()}

    def whole_residuals(self) -> list[Tensor | None]:
        """Every residual as an unsharded run keeps it (FSDP2: gathered into host memory one at a time, a
        collective every process calls)."""
        return [None if r is None else self._on_host(i, self._full_residual(i, r))
                for i, r in enumerate(self.residuals)]

    def _on_host(self, i: int, whole: Tensor) -> Tensor:
        """FSDP2: a tensor of parameter i gathered whole goes to host memory at once, so the device holds one
        whole tensor at a time, never the whole group (unsharded: left where it is)."""
        return whole.cpu() if shards.is_sharded(self.params[i][1]) else whole

    @torch.no_grad()
    def load_whole_residuals(self, saved: list[Tensor | None]) -> None:
        """Set each residual from :meth:`whole_residuals`' (FSDP2: this process's part of it)."""
        for i, (r, whole) in enumerate(zip(self.residuals, saved, strict=True)):
            if r is not None and whole is not None:
                self._set_residual(i, r, whole)

    def _full_residual(self, i: int, r: Tensor) -> Tensor:
        """Parameter i's whole residual from this process's (FSDP2: its rows, gathered; a collective)."""
        return shards.full_rows(r, self.params[i][1])

    def _set_residual(self, i: int, r: Tensor, whole: Tensor) -> None:
        name, p = self.params[i]
        if whole.numel() != p.numel():  # e.g. a sharded checkpoint of an older hyft kept rank 0's rows only
            raise HyftError(f"the saved residual of {name} has {whole.numel()} values, not the weight's {p.numel()}; "
                            "this checkpoint cannot be resumed by this version")
        r.view(-1).copy_(shards.slice_of(whole, p))

    @torch.no_grad()
    def load_state_tensors(self, tensors: Callable[[str], Tensor | None]) -> None:
        """Set every ZO tensor (and residual: zero when absent) from the whole tensors ``tensors(name)``
        (FSDP2: this process's rows of them)."""
        for i, ((name, p), r) in enumerate(zip(self.params, self.residuals, strict=True)):
            key = canonical_name(name)
            value = tensors(key)
            if value is None:
                raise HyftError(f"no tensor {key!r} to restore the ZO parameters from")
            shards.copy_from_full_(p.detach(), value)
            if r is not None:
                saved = tensors(key + RESIDUAL)
                r.zero_() if saved is None else self._set_residual(i, r, saved)
        self.load_extra_tensors(tensors)


class ZOEngine(EngineState):
    """Perturbs and updates a fixed list of named parameters of ``model`` from seeds only.

    ``eps`` and ``two_sided`` describe the SPSA points; in bf16/fp16 the update follows the direction those
    points actually applied (see :mod:`hyft.engine.zmath`), and ``compensate`` keeps a residual per tensor so
    that updates below a weight's ulp accumulate instead of rounding away (or ``rounding="stochastic"``
    rounds each update unbiasedly, with no residual).
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], dist: str = "gaussian",
                 eps: float | None = None, two_sided: bool = True, compensate: bool = True,
                 rounding: str = "nearest"):
        self._init_update_rule(params, dist, eps, two_sided, compensate, rounding, [p for _, p in params])
        refuse_outside_readers(model, params)
        index = {id(p): i for i, (_, p) in enumerate(params)}
        # module -> [(attribute name, parameter index)] for the ZO parameters it owns directly
        self.owners: dict[nn.Module, list[tuple[str, int]]] = {}
        uses = [0] * len(params)
        for module in model.modules():
            for attr, p in module.named_parameters(recurse=False):
                if id(p) in index:
                    self.owners.setdefault(module, []).append((attr, index[id(p)]))
                    uses[index[id(p)]] += 1
        missing = [params[i][0] for i, n in enumerate(uses) if n == 0]
        if missing:
            raise HyftError(f"ZO parameters not owned by any module of the model: {', '.join(missing[:3])}")
        strided = [name for name, p in params if not p.is_contiguous()]
        if strided:
            raise HyftError(f"ZO parameters must be contiguous: {', '.join(strided[:3])}")
        self._checked = False  # whether a perturbed pass has shown that every parameter is reached
        # embeddings and linear layers are streamed by row blocks when their weight is tied (two users)
        # or larger than the lookahead budget: no temporary is ever bigger than one block of rows
        shared = {i for i, n in enumerate(uses) if n > 1}
        self.streamed: dict[nn.Module, int] = {}
        for module, attrs in self.owners.items():
            i = _streamable(module, attrs)
            if i is not None and (i in shared or params[i][1].numel() > lookahead(params[i][1].device)):
                self.streamed[module] = i
        for i in sorted(shared):
            users = [m for m, attrs in self.owners.items() if any(j == i for _, j in attrs)]
            if all(m in self.streamed for m in users):
                shared.discard(i)
            else:  # a tied weight with a user that cannot be streamed: made whole, kept for the pass
                for m in users:
                    self.streamed.pop(m, None)
        self.shared = shared
        self.order = [m for m in self.owners if m not in self.streamed]
        self.position = {m: j for j, m in enumerate(self.order)}

    def _init_update_rule(self, params: list[tuple[str, nn.Parameter]], dist: str, eps: float | None,
                          two_sided: bool, compensate: bool, rounding: str, pieces: list[Tensor]) -> None:
        """The state the update rule reads (directions, shifts, updates, snapshots), checked once for this class
        and the sharded engine (whose residuals cover only its rows: ``pieces`` are the tensors the residuals
        are shaped like)."""
        noise.check_dist(dist)
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"unknown rounding {rounding!r}; choose nearest or stochastic")
        if rounding == "stochastic" and any(p.dtype == torch.float16 for _, p in params):
            raise ValueError("stochastic rounding is for bfloat16 (or float32) weights, not float16")
        self.dist, self.params, self.rounding = dist, params, rounding
        self.applied = zmath.Applied(eps, two_sided) if eps is not None else None
        self.residuals: list[Tensor | None] = [
            torch.zeros_like(piece, memory_format=torch.contiguous_format)
            if compensate and rounding == "nearest" and p.dtype not in noise.FULL_PRECISION else None
            for (_, p), piece in zip(params, pieces, strict=True)
        ]
        self._pending: tuple[int, tuple[float, ...]] | None = None  # (seed, shifts) applied by shift_

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def target(self, i: int, step_seed: int) -> zmath.Target:
        name, p = self.params[i]
        return zmath.Target(p.detach(), self.residuals[i], direction_seed(step_seed, name))

    def direction(self, i: int, step_seed: int) -> Tensor:
        name, p = self.params[i]
        return noise.direction(p.shape, direction_seed(step_seed, name), self.dist, p.device)

    def _perturbed_values(self, indices: list[int], step_seed: int, scale: float) -> list[Tensor]:
        return zmath.perturbed([self.target(i, step_seed) for i in indices], scale, self.dist)

    def _perturbed_rows(self, i: int, step_seed: int, scale: float, r0: int, r1: int) -> Tensor:
        """Rows r0:r1 of parameter i (2-d) at θ + scale·z, made without the rest of the matrix."""
        cols = self.params[i][1].shape[1]
        block = zmath.perturbed_range(self.target(i, step_seed), scale, self.dist, r0 * cols, r1 * cols)
        return block.view(r1 - r0, cols)

    def _perturbed_lookup(self, i: int, step_seed: int, scale: float, rows: Tensor) -> Tensor:
        """The given rows of parameter i (an embedding) at θ + scale·z: only those rows are drawn."""
        return zmath.perturbed_rows(self.target(i, step_seed), scale, self.dist, rows)

    def _batch(self, module: nn.Module, ready: dict[int, Tensor], used: set[int], budget: int) -> list[int]:
        """The parameters whose temporaries are made when ``module`` runs: its own, then those of the next
        modules until ``budget`` elements."""
        batch: list[int] = []
        size = 0
        for later in self.order[self.position[module]:]:
            missing = [i for _, i in self.owners[later]
                       if i not in ready and i not in batch and (later is module or i not in used)]
            more = sum(self.params[i][1].numel() for i in missing)
            if batch and size + more > budget:
                break
            batch += missing
            size += more
        return batch

    @contextmanager
    def perturbed(self, step_seed: int, scale: float) -> Iterator[None]:
        """Within the block, forwards see θ + scale·z(step_seed); the stored weights are untouched.

        When a module runs, its temporaries are made together with those of the next modules (in
        registration order, which is the forward order of the usual decoder stacks) up to
        ``lookahead(device)`` elements, so that each batch of noise ops is large; a temporary is dropped
        once its module has run (tied weights that are not streamed at the end of the block).
        """
        ready: dict[int, Tensor] = {}
        budget = lookahead(self.params[0][1].device)
        used: set[int] = set()  # already run: not made again ahead (registration order ≠ forward order)

        def swap_in(module: nn.Module, _args: object) -> None:
            if any(i not in ready for _, i in self.owners[module]):
                batch = self._batch(module, ready, used, budget)
                ready.update(zip(batch, self._perturbed_values(batch, step_seed, scale), strict=True))
            for attr, i in self.owners[module]:
                # a plain tensor, read by the module's forward; tied weights stay ready for their other user
                module._parameters[attr] = ready[i] if i in self.shared else ready.pop(i)
                used.add(i)

        def swap_out(module: nn.Module, _args: object, _out: object) -> None:
            for attr, i in self.owners[module]:
                module._parameters[attr] = self.params[i][1]

        handles = []
        for module in self.order:
            handles.append(module.register_forward_pre_hook(swap_in))
            handles.append(module.register_forward_hook(swap_out))
        saved = {m: m.__dict__.get("forward") for m in self.streamed}
        for module, i in self.streamed.items():
            module.forward = self._streamed_forward(module, i, step_seed, scale, used)
        try:
            yield
            if not self._checked:
                self._check_reached(used)
        finally:
            for h in handles:
                h.remove()
            for module, attrs in self.owners.items():
                for attr, i in attrs:
                    module._parameters[attr] = self.params[i][1]
            for module, forward in saved.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def _check_reached(self, used: set[int]) -> None:
        """After the first perturbed pass: every ZO parameter must have been swapped in by its module's
        forward; one read elsewhere (peft's lora_embedding_A/B, DoRA) would be updated without having been
        perturbed, so refuse it in one line."""
        missing = [self.params[i][0] for i in range(len(self.params)) if i not in used]
        if missing:
            raise HyftError(f"ZO parameters read outside their module's forward cannot be perturbed: "
                            f"{', '.join(missing[:3])}; leave them out of the ZO group (--zo-params, LoRA targets)")
        self._checked = True

    def _streamed_forward(self, module: nn.Module, i: int, step_seed: int, scale: float, used: set[int]
                          ) -> Callable[[Tensor], Tensor]:
        """The forward of an embedding (only the looked-up rows are made) or a linear layer (its output
        computed one block of rows at a time) with weight θ + scale·z; running it marks the module's
        parameters (weight and bias) as ``used``."""
        p = self.params[i][1]
        rows, cols = p.shape
        own = [j for _, j in self.owners[module]]

        if isinstance(module, nn.Embedding):
            def lookup(ids: Tensor) -> Tensor:
                used.update(own)
                if ids.is_meta:  # shapes only (``hyft bench --launches``): every id a row of its own
                    needed, inverse = ids.reshape(-1), torch.arange(ids.numel(), device=ids.device).view(ids.shape)
                else:
                    needed, inverse = torch.unique(ids, return_inverse=True)
                per = _rows_per_block(cols, lookahead(p.device))  # bounded temporaries for large vocabularies
                return torch.cat([self._perturbed_lookup(i, step_seed, scale, needed[k:k + per])
                                  for k in range(0, needed.numel(), per)])[inverse]
            return lookup

        per = _rows_per_block(cols, lookahead(p.device))
        bias_index = next((j for attr, j in self.owners[module] if attr == "bias"), None)

        def head(h: Tensor, *_args: object, **_kwargs: object) -> Tensor:
            used.update(own)
            bias = module.bias
            if bias_index is not None:
                (bias,) = self._perturbed_values([bias_index], step_seed, scale)
            out: Tensor | None = None
            for r0 in range(0, rows, per):
                r1 = min(r0 + per, rows)
                block = F.linear(h, self._perturbed_rows(i, step_seed, scale, r0, r1),
                                 None if bias is None else bias[r0:r1])
                if out is None:  # the dtype F.linear gives (under autocast: its precision, not h's)
                    out = block.new_empty((*h.shape[:-1], rows))
                out[..., r0:r1] = block
            assert out is not None
            return out
        return head

    @property
    def can_shift(self) -> bool:
        """In-place perturbations (the fused hybrid step) need full precision to be replayed exactly."""
        return all(p.dtype in noise.FULL_PRECISION for _, p in self.params)

    @torch.no_grad()
    def shift_(self, step_seed: int, scale: float) -> None:
        """θ ← θ + scale·z(step_seed) in place, so that a forward and a backward see the perturbed weights
        with no temporaries; the update that ends the step repeats the shifts in its log line."""
        if not self.can_shift:
            raise HyftError("in-place perturbation needs float32 ZO weights; use the unfused step in bf16/fp16")
        if self._pending and self._pending[0] != step_seed:
            raise HyftError("in-place shifts of two different directions are pending")
        targets = [self.target(i, step_seed) for i in range(len(self.params))]
        zmath.update_(targets, 0.0, 0.0, self.dist, shifts=(scale,))
        self._pending = (step_seed, self._pending[1] + (scale,) if self._pending else (scale,))

    @torch.no_grad()
    def update(self, u: ZOUpdate) -> None:
        """θ ← θ − lr·(coef·v + weight_decay·θ); v = z in full precision, the applied direction in bf16/fp16.

        ``u.shifts`` not applied yet by :meth:`shift_` (all of them in a replay) are applied first, in the
        same pass. A zero step (lr = 0, or coef = 0 without decay) with no shifts writes nothing: θ stays
        bitwise identical.
        """
        done = self._pending[1] if self._pending and self._pending[0] == u.seed else ()
        if u.shifts[:len(done)] != done:
            raise HyftError(f"update of step {u.step} does not finish the in-place shifts {done}")
        self._pending = None
        shifts = u.shifts[len(done):]
        step = u.lr * u.coef
        decay = u.lr * u.weight_decay
        if step == 0.0 and decay == 0.0 and not shifts:
            return
        targets = [self.target(i, u.seed) for i in range(len(self.params))]
        zmath.update_(targets, step, decay, self.dist, self.applied, shifts, self.rounding)


def refuse_outside_readers(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
    """DoRA layers read their base weight outside the base layer's forward (for the weight norm), where
    the perturbation hooks cannot reach: refuse them rather than perturb them wrongly."""
    ids = {id(p) for _, p in params}
    for name, module in model.named_modules():
        dora = getattr(module, "use_dora", None)
        if not (isinstance(dora, dict) and any(dora.values()) and hasattr(module, "get_base_layer")):
            continue
        if any(id(p) in ids for p in module.get_base_layer().parameters(recurse=False)):
            raise HyftError(f"DoRA ({name}) reads the base weight outside its forward, so ZO on the base "
                                 "cannot perturb it; set use_dora: false or use fo-peft")


def _rows_per_block(cols: int, budget: int) -> int:
    """Rows of a streamed matrix made at once: about ``budget`` elements (at least one row)."""
    return max(1, budget // cols)


def _streamable(module: nn.Module, attrs: list[tuple[str, int]]) -> int | None:
    """The index of the weight of a plain embedding or linear layer, whose forward is a row lookup or a
    matmul and can run block by block (subclasses may do more, e.g. scale); None otherwise."""
    weight = next((i for attr, i in attrs if attr == "weight"), None)
    if weight is None or any(attr not in ("weight", "bias") for attr, _ in attrs):
        return None
    if type(module) is nn.Embedding:
        return weight if module.max_norm is None and len(attrs) == 1 else None
    return weight if type(module) is nn.Linear else None


def select_params(
    model: nn.Module, pattern: str | None = None, trainable: bool | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Named parameters, each tied tensor once, optionally filtered by regex on the canonical name
    and by ``requires_grad``."""
    regex = re.compile(pattern) if pattern else None
    out = []
    for name, p in model.named_parameters():  # named_parameters() already skips repeated (tied) tensors
        if trainable is not None and p.requires_grad != trainable:
            continue
        if regex and not regex.search(canonical_name(name)):
            continue
        out.append((name, p))
    return out


class ZOLog:
    """The run's ZO updates as JSON lines: a header (what was perturbed), then one line per update."""

    def __init__(self, path: Path):
        self.path = path

    def start(self, header: dict) -> None:
        self.path.write_text(json.dumps({"header": header}) + "\n")

    def append(self, u: ZOUpdate) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(u)) + "\n")

    @staticmethod
    def read(path: Path) -> tuple[dict, list[ZOUpdate]]:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines or "header" not in lines[0]:
            raise ValueError(f"{path}: not a hyft ZO log (no header line)")
        scheme = lines[0]["header"].get("scheme", "per-tensor-v1")
        if scheme != noise.SCHEME:
            raise ValueError(f"its directions use the {scheme!r} scheme and this hyft draws {noise.SCHEME!r}; "
                             "use the hyft version that wrote it")
        return lines[0]["header"], [ZOUpdate(**row) for row in lines[1:]]
