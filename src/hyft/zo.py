"""The perturbation engine: seeded random directions, perturbed forwards that never touch the stored
weights, in-place SPSA updates, and the (seed, coefficient) log that replays them.

How a perturbed forward works: a forward pre-hook on every module that owns ZO parameters swaps in a
temporary ``θ + scale·z`` for that module's own weights, and its forward hook swaps the stored Parameter
back. Temporaries are made a few modules ahead (up to ``LOOKAHEAD`` elements) and dropped once their
module has run. A weight tied between an embedding and an LM head (SmolLM2, GPT-2, OPT) is never made
whole: the lookup builds only the perturbed rows it needs and the head computes its logits one block of
rows at a time, both from the same seed, so the two uses see the same ``θ + scale·z`` and the only
temporary is one block (other tied weights are made whole and kept for the pass). The stored weights
are never written during the estimate, so a step with learning rate 0 leaves θ bitwise unchanged in
every dtype, unlike MeZO's in-place +ε, −2ε, +ε sequence, which drifts in low precision.

Directions: ``z`` for a parameter is drawn (by :mod:`hyft.noise`, in seeded chunks) from a seed mixing
the step seed and a hash of the parameter's canonical name, so it is regenerated identically for the
perturbation, the update and a later replay, whatever wrapping (peft) the model has.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyft import noise


def canonical_name(name: str) -> str:
    """A parameter's name in the unwrapped base model (peft adds ``base_model.model.`` and ``.base_layer``)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def direction_seed(step_seed: int, name: str) -> int:
    return (step_seed * 0x9E3779B1 + zlib.crc32(canonical_name(name).encode())) % (2**63 - 1)


@dataclass
class ZOUpdate:
    """One logged update: θ ← θ − lr·(coef·z(seed) + weight_decay·θ)."""

    step: int
    seed: int
    coef: float
    lr: float
    weight_decay: float = 0.0


LOOKAHEAD = 1 << 22  # elements of perturbed temporaries made in one batch (16 MiB in float32)


class ZOEngine:
    """Perturbs and updates a fixed list of named parameters of ``model`` from seeds only."""

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], dist: str = "gaussian"):
        noise.check_dist(dist)
        self.dist = dist
        self.params = params
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
            raise ValueError(f"ZO parameters not owned by any module: {missing[:3]}")
        self.shared = {i for i, n in enumerate(uses) if n > 1}
        # tied embedding/LM-head weights are streamed by row blocks instead of swapped in whole
        self.streamed: dict[nn.Module, int] = {}
        for i in sorted(self.shared):
            users = [m for m, attrs in self.owners.items() if any(j == i for _, j in attrs)]
            if all(_streamable(m, self.owners[m], i) for m in users):
                self.streamed.update(dict.fromkeys(users, i))
                self.shared.discard(i)
        for m in self.streamed:
            del self.owners[m]
        self.order = list(self.owners)
        self.position = {m: j for j, m in enumerate(self.order)}

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def direction(self, i: int, step_seed: int) -> Tensor:
        name, p = self.params[i]
        return noise.direction(p.shape, direction_seed(step_seed, name), self.dist, p.device)

    def _perturbed_values(self, indices: list[int], step_seed: int, scale: float) -> list[Tensor]:
        seeded = [(self.params[i][1], direction_seed(step_seed, self.params[i][0])) for i in indices]
        return noise.perturbed(seeded, scale, self.dist)

    @contextmanager
    def perturbed(self, step_seed: int, scale: float) -> Iterator[None]:
        """Within the block, forwards see θ + scale·z(step_seed); the stored weights are untouched.

        When a module runs, its temporaries are made together with those of the next modules (in
        registration order, which is the forward order of the usual decoder stacks) up to
        ``LOOKAHEAD`` elements, so that the noise threads get enough chunks to share; a temporary is
        dropped once its module has run (tied weights that are not streamed at the end of the block).
        """
        ready: dict[int, Tensor] = {}
        used: set[int] = set()  # already run: not made again ahead (registration order ≠ forward order)

        def swap_in(module: nn.Module, _args: object) -> None:
            if any(i not in ready for _, i in self.owners[module]):
                batch, size = [], 0
                for later in self.order[self.position[module]:]:
                    missing = [i for _, i in self.owners[later]
                               if i not in ready and i not in batch and (later is module or i not in used)]
                    more = sum(self.params[i][1].numel() for i in missing)
                    if batch and size + more > LOOKAHEAD:
                        break
                    batch += missing
                    size += more
                ready.update(zip(batch, self._perturbed_values(batch, step_seed, scale), strict=True))
            for attr, i in self.owners[module]:
                # a plain tensor, read by the module's forward; tied weights stay ready for their other user
                module._parameters[attr] = ready[i] if i in self.shared else ready.pop(i)
                used.add(i)

        def swap_out(module: nn.Module, _args: object, _out: object) -> None:
            for attr, i in self.owners[module]:
                module._parameters[attr] = self.params[i][1]

        handles = []
        for module in self.owners:
            handles.append(module.register_forward_pre_hook(swap_in))
            handles.append(module.register_forward_hook(swap_out))
        saved = {m: m.__dict__.get("forward") for m in self.streamed}
        for module, i in self.streamed.items():
            module.forward = self._streamed_forward(module, i, step_seed, scale)
        try:
            yield
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

    def _streamed_forward(self, module: nn.Module, i: int, step_seed: int, scale: float
                          ) -> Callable[[Tensor], Tensor]:
        """The forward of an embedding or LM head with weight θ + scale·z, made one row block at a time."""
        name, p = self.params[i]
        seed = direction_seed(step_seed, name)
        rows, cols = p.shape
        per = _rows_per_block(cols)
        blocks = [(r, min(r + per, rows)) for r in range(0, rows, per)]

        def block(r0: int, r1: int) -> Tensor:
            return noise.perturbed_rows(p, seed, scale, self.dist, r0, r1)

        if isinstance(module, nn.Embedding):
            def lookup(ids: Tensor) -> Tensor:
                needed, inverse = torch.unique(ids, return_inverse=True)
                out = p.new_empty((needed.numel(), cols))
                for r0, r1 in blocks:  # blocks holding none of the ids are never drawn
                    hit = (needed >= r0) & (needed < r1)
                    if hit.any():
                        out[hit] = block(r0, r1)[needed[hit] - r0]
                return out[inverse]
            return lookup

        def head(h: Tensor) -> Tensor:
            out = h.new_empty((*h.shape[:-1], rows))
            for r0, r1 in blocks:
                out[..., r0:r1] = F.linear(h, block(r0, r1))
            return out
        return head

    @torch.no_grad()
    def update(self, u: ZOUpdate) -> None:
        """θ ← θ − lr·(coef·z + weight_decay·θ), with fp32 arithmetic for low-precision weights.

        A zero step (lr = 0, or coef = 0 without decay) writes nothing: θ stays bitwise identical.
        """
        step = u.lr * u.coef
        decay = u.lr * u.weight_decay
        if step == 0.0 and decay == 0.0:
            return
        noise.axpy_([(p.data, direction_seed(u.seed, name)) for name, p in self.params], -step, self.dist,
                    shrink=1.0 - decay)


def _rows_per_block(cols: int) -> int:
    """Rows of a streamed matrix made at once: about ``LOOKAHEAD`` elements, in whole noise chunks (so no
    chunk is drawn twice) when a chunk-aligned block fits in that budget."""
    aligned = math.lcm(cols, noise.CHUNK) // cols
    if aligned * cols > LOOKAHEAD:
        return max(1, LOOKAHEAD // cols)
    return aligned * (LOOKAHEAD // (aligned * cols))


def _streamable(module: nn.Module, attrs: list[tuple[str, int]], i: int) -> bool:
    """A plain embedding or bias-free linear layer whose only ZO weight is the tied matrix i: its forward
    is a row lookup or a matmul, so it can run block by block (subclasses may do more, e.g. scale)."""
    if attrs != [("weight", i)]:
        return False
    if type(module) is nn.Embedding:
        return module.max_norm is None
    return type(module) is nn.Linear and module.bias is None


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
