r"""Data-parallel curvature: what the optimizer exchanges between ranks, and when.

Each rank runs forward and backward on its own shard of the global batch (:math:`N_r` samples,
:math:`B = \sum_r N_r`); the weight gradients are averaged by ``DistributedDataParallel`` (or by
:func:`all_reduce_gradients` for a plain module). The curvature must be the one a single process
would build from the global batch, and every rank must hold the same state after every step.
:class:`DataParallel` is the optimizer's part of that contract:

1. **Agreement** (one small all-reduce per step): whether any rank saw a non-finite loss or
   gradient (then every rank skips the step), each rank's sample count per layer, the mean loss.
2. **Per-sample scale.** The contract for the losses is DDP's: the average over ranks of the
   per-rank losses is the global loss. For ``loss_reduction="mean"`` the global loss is the mean
   over the global batch, so rank r back-propagates :math:`L_r = \frac{W}{B}\sum_{i\in r}\ell_i`
   -- with equal shards simply its local mean, otherwise the local mean times
   :meth:`DataParallel.loss_weight`; the per-sample gradient rows are then autograd's rows times
   :math:`B/W` (times :math:`1/W` for ``"sum"``, where :math:`L_r = W\sum_{i\in r}\ell_i`). The
   optimizer's own passes (the Monte-Carlo Fisher) use local means and keep the local scale.
3. **Statistics** (KFAC's A and G, the Monte-Carlo G, the diagonal Fisher; every
   ``curvature_update_freq`` steps): each rank forms its statistic of its rows, and one
   coalesced all-reduce per dtype forms :math:`\sum_r R_r S_r / \sum_r R_r` (:math:`R_r` the rank's
   rows), exactly the global batch's statistic; it is then folded into the running average.
4. **K-BFGS's second pass** runs on each rank's shard with the parameters frozen (no weight
   gradients, so DDP reduces nothing; the pass runs under ``no_sync``). The batch means
   :math:`\bar h`, :math:`\bar g` at both points and :math:`\bar a` are row-weighted means over ranks
   (vectors: one all-reduce that also carries the "non-finite at the new point" flag and the loss).
5. **Work distribution.** ``distribute="replicate"``: every rank computes every inverse and BFGS
   update (no extra communication; ranks agree because their inputs are bit-identical).
   ``distribute="layerwise"``: each layer is owned by one rank (cost-balanced,
   :mod:`optimizers.assignment`), which alone computes its damped inverses (sent to the others
   by one flat broadcast per owner and dtype) and its BFGS / Hessian-action updates (the updated
   factor state sent by one object broadcast per owner). Every rank keeps every factor, so
   preconditioning stays local and ``state_dict()`` is identical on all ranks.

With a :class:`~optimizers.communicator.LocalCommunicator` every method reduces to the
single-process code path (same calls, same order, no communication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from curvature.blocks import (DiagonalBlock, KroneckerBlock, a_statistic, batch_argument, chain_finishers, g_statistic,
                              prepared_with_batch)
from curvature.capture import LayerRecord
from curvature.factors import Factor
from curvature.inverter import BatchedInverter
from curvature.linalg import InversionError, all_finite, read_scalars
from curvature.update_batch import UpdateBatch
from optimizers.assignment import balanced_assignment, layer_cost
from optimizers.communicator import Communicator, LocalCommunicator

DISTRIBUTE_MODES = ("replicate", "layerwise")
OTHER_RANK = "non-finite loss or gradient on another rank"


def _declares(obj: object, capability: str) -> bool:
    return bool(getattr(obj, capability, False))


def _rows(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.shape[0])


@dataclass
class StepAgreement:
    """What the ranks agreed on at the start of a step.

    ``reason``: why the step is skipped (this rank's own reason, or :data:`OTHER_RANK`), or None.
    ``counts``: layer name -> samples per rank. ``loss``: the mean over ranks of the per-rank losses
    (the global loss under the loss contract), or None without a closure.
    """

    reason: str | None
    counts: dict[str, list[int]] = field(default_factory=dict)
    loss: float | None = None


class DataParallel:
    """The optimizer's data-parallel behaviour over a communicator (see the module doc).

    Args:
        comm: the :class:`~optimizers.communicator.Communicator` (a local one for one process).
        distribute: "replicate" or "layerwise".
        loss_reduction: the optimizer's ``loss_reduction`` ("mean" or "sum").
    """

    def __init__(self, comm: Communicator | None = None, distribute: str = "replicate",
                 loss_reduction: str = "mean") -> None:
        if distribute not in DISTRIBUTE_MODES:
            raise ValueError(f"distribute must be one of {DISTRIBUTE_MODES}, got {distribute!r}")
        self.comm = comm if comm is not None else LocalCommunicator()
        if not isinstance(self.comm, Communicator):
            raise TypeError(f"comm must be a Communicator, got {type(self.comm).__name__}")
        self.distribute = distribute
        self.loss_reduction = loss_reduction
        self.owners: dict[str, int] = {}
        self._agreement: StepAgreement | None = None
        self._mc_noise: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    @property
    def active(self) -> bool:
        """True with more than one rank."""
        return self.comm.distributed

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def attach(self, slots: Mapping[str, Any]) -> None:
        """Check that every block can be reduced across ranks and assign owners (layerwise)."""
        if self.active:
            for name, slot in slots.items():
                self._check_block(name, slot.block)
        self.assign(slots)

    def assign(self, slots: Mapping[str, Any]) -> None:
        """(Re)compute the layer owners from the layers' costs (all rank 0 when replicating)."""
        costs = {}
        for name, slot in slots.items():
            kind = "update" if slot.block.needs_second_pass else "inverse"
            costs[name] = layer_cost(slot.adapter.a_dim, slot.adapter.g_dim, kind)
        if self.distribute == "layerwise":
            self.owners = balanced_assignment(costs, self.world_size)
        else:
            self.owners = {name: self.rank for name in costs}

    @staticmethod
    def _check_block(name: str, block: Any) -> None:
        if isinstance(block, KroneckerBlock):
            for side, factor in (("A", block.a_factor), ("G", block.g_factor)):
                if _declares(factor, "uses_statistics") and type(factor).observe is Factor.observe:
                    raise ValueError(
                        f"layer {name!r}: the {side} factor {type(factor).__name__} takes statistics only as rows "
                        "(observe_gram); data-parallel training reduces formed statistics across ranks, so "
                        "implement observe(statistic) as well"
                    )
            return
        if isinstance(block, DiagonalBlock):
            return
        raise ValueError(
            f"layer {name!r}: {type(block).__name__} has no data-parallel reduction (supported: KroneckerBlock "
            "with statistics, secant or Hessian-action factors, and DiagonalBlock); train it on one process"
        )

    def owns(self, name: str) -> bool:
        """Whether this rank computes layer ``name``'s factor work."""
        return self.owners.get(name, self.rank) == self.rank

    def loss_weight(self, n_local: int) -> float:
        r"""The factor :math:`N_r W / B` by which rank r multiplies its *local mean* loss when the
        shards have unequal sizes, so that DDP's average is the global-batch mean (one all-reduce of
        the count; 1.0 on one process)."""
        if not self.active:
            return 1.0
        (total,) = self.comm.all_reduce_sum([torch.tensor([float(n_local)], dtype=torch.float64,
                                                         device=self.comm.device)])
        return float(n_local) * self.world_size / float(total)

    # ------------------------------------------------------------------ step agreement
    def begin_step(self) -> None:
        self.comm.stats.begin_step()
        self._agreement = None
        self._mc_noise = {}

    def agree(self, reason: str | None, loss: float | None, records: Mapping[str, LayerRecord],
              names: Sequence[str]) -> StepAgreement:
        """One all-reduce: any rank's non-finite flag, the samples per rank of every layer, the loss."""
        counts_local = [int(records[n].batch_size) if n in records else 0 for n in names]
        if not self.active:
            agreement = StepAgreement(reason, {n: [c] for n, c in zip(names, counts_local)}, loss)
            self._agreement = agreement
            return agreement
        w = self.world_size
        vec = torch.zeros(2 + len(names) * w, dtype=torch.float64, device=self.comm.device)
        vec[0] = 1.0 if reason is not None else 0.0
        vec[1] = 0.0 if (loss is None or reason is not None) else float(loss)
        for j, c in enumerate(counts_local):
            vec[2 + j * w + self.rank] = float(c)
        (total,) = self.comm.all_reduce_sum([vec])
        values = total.tolist()
        any_bad = values[0] > 0
        if any_bad and reason is None:
            reason = OTHER_RANK
        counts = {n: [int(round(values[2 + j * w + r])) for r in range(w)] for j, n in enumerate(names)}
        mean_loss = None if loss is None or any_bad else values[1] / w
        agreement = StepAgreement(reason, counts, mean_loss)
        self._agreement = agreement
        return agreement

    def agreed_loss(self, local: float | None) -> float | None:
        """The loss of the step over all ranks (the local loss on one process)."""
        if not self.active or self._agreement is None:
            return local
        return self._agreement.loss

    def set_grad_scales(self, records: Mapping[str, LayerRecord]) -> None:
        r"""Per-sample scale of gradient rows from the user's closure: :math:`B/W` ("mean") or :math:`1/W`
        ("sum"), from the agreed sample counts (see the module doc). No-op on one process."""
        if not self.active:
            return
        if self._agreement is None:
            raise RuntimeError("DataParallel.set_grad_scales before agree()")
        for name, rec in records.items():
            if rec.grad_rows is None:
                continue
            total = sum(self._agreement.counts.get(name, [0]))
            scale = total / self.world_size if self.loss_reduction == "mean" else 1.0 / self.world_size
            rec.grad_scale, rec._g_rows = float(scale), None

    # ------------------------------------------------------------------ Monte-Carlo Fisher noise
    def mc_noise(self, name: str, draw: Callable[[int], torch.Tensor], n_local: int) -> torch.Tensor | None:
        r"""This rank's rows of noise drawn once for the *global* batch, so the sampled targets are the
        ones a single process would draw: ``draw(B)`` is called once per step (on every rank, so the
        generators stay identical) and rows :math:`[o_r, o_r + N_r)` are returned, :math:`o_r` the
        samples of lower ranks. None on one process (the caller draws as usual). ``name`` is a
        layer whose counts give the offsets."""
        if not self.active:
            return None
        if "noise" not in self._mc_noise:
            counts = self._agreement.counts[name]
            self._mc_noise["noise"] = draw(sum(counts))
            self._mc_noise["offset"] = sum(counts[: self.rank])
        offset = self._mc_noise["offset"]
        self._mc_noise["offset"] = offset + n_local
        return self._mc_noise["noise"][offset:offset + n_local]

    # ------------------------------------------------------------------ statistics
    def update_statistics(self, slots: Mapping[str, Any], records: Mapping[str, LayerRecord],
                          grads: Mapping[str, torch.Tensor], empty: Callable[[], LayerRecord]) -> None:
        """Fold the batch statistics of every block in; across ranks, one coalesced weighted mean."""
        if not self.active:
            for name, slot in slots.items():
                slot.block.update_statistics(records.get(name) or empty(), grads[name])
            return
        items: list[tuple[torch.Tensor, float]] = []
        folds: list[Callable[[torch.Tensor], None]] = []
        after: list[Callable[[], None]] = []
        for name, slot in slots.items():
            block, record, grad = slot.block, records.get(name) or empty(), grads[name]
            if isinstance(block, KroneckerBlock):
                for side, factor in (("a", block.a_factor), ("g", block.g_factor)):
                    if _declares(factor, "uses_statistics"):
                        if side == "a":
                            stat, rows = a_statistic(record, slot.adapter), _rows(record.input_rows)
                        else:
                            stat, rows = g_statistic(record), _rows(record.grad_rows)
                        items.append((stat, rows))
                        folds.append(factor.observe)
                    if _declares(factor, "uses_gradient"):  # the gradient is already global
                        v = grad.T if side == "a" else grad
                        after.append(lambda f=factor, v=v: f.observe_gradient(v))
            elif isinstance(block, DiagonalBlock):
                stat = block.batch_statistic(record, grad)
                weight = 1.0 if block.source == "gradient" else float(record.batch_size)
                items.append((stat, weight))
                folds.append(block.fold_statistic)
            else:  # pragma: no cover - rejected by attach()
                raise ValueError(f"layer {name!r}: no data-parallel reduction for {type(block).__name__}")
        for fold, stat in zip(folds, self.comm.weighted_mean(items)):
            fold(stat)
        for fn in after:
            fn()

    # ------------------------------------------------------------------ inverses
    def inverter(self, base: BatchedInverter) -> "LayerInverter":
        """A batched inverter whose requests are computed by each layer's owner (layerwise) and
        broadcast; with "replicate" every request is computed locally."""
        return LayerInverter(self, base)

    # ------------------------------------------------------------------ second pass
    def prepare_second_pass(self, slots: Mapping[str, Any], before: Mapping[str, LayerRecord],
                            after: Mapping[str, LayerRecord]) -> tuple[list[torch.Tensor], Callable[[list[float]], None]]:
        """One process: every ``needs_second_pass`` block's candidates, computed on the device.

        Returns ``(scalars, finish)``: the 0-dim tensors every block's decisions need (read them at
        once, together with anything else the step reads) and ``finish(values)``, which commits each
        block's update from those values. Blocks without ``prepare_after_step`` update inside
        ``finish`` with their own reads. Nothing is changed before ``finish``.
        """
        if self.active:
            raise RuntimeError("prepare_second_pass is the one-process path; use second_pass with several ranks")
        prepared: list[tuple[int, Callable[[list[float]], None]]] = []
        scalars: list[torch.Tensor] = []
        updates = UpdateBatch()  # the candidate inverse-BFGS updates of all blocks that join it, computed together
        for name in [n for n, s in slots.items() if s.block.needs_second_pass]:
            block = slots[name].block
            if hasattr(block, "prepare_after_step"):
                part, fin = block.prepare_after_step(before[name], after[name], **batch_argument(block, updates))
            else:
                part, fin = [], (lambda _values, b=block, n=name: b.update_after_step(before[n], after[n]))
            prepared.append((len(part), fin))
            scalars += part
        return prepared_with_batch(scalars, chain_finishers(prepared), updates)

    def second_pass(self, slots: Mapping[str, Any], before: Mapping[str, LayerRecord],
                    after: Mapping[str, LayerRecord], bad: bool, loss_after: float | None) -> tuple[bool, float | None]:
        """Agree on the second pass and update the blocks that consume it.

        The caller has checked that every such layer has records of both passes. Returns
        ``(bad, loss_after)`` over all ranks: whether any rank saw a non-finite loss or gradient at the new point (then no block was updated and every rank reverts) and the mean
        loss at the new point. Otherwise every ``needs_second_pass`` block has consumed the global
        batch means (layerwise: on its owner, the updated state then broadcast).
        """
        users = [n for n, s in slots.items() if s.block.needs_second_pass]
        if bad and not self.active:
            return True, loss_after
        if not self.active:  # every block's candidates first, then one host read for all their decisions
            scalars, finish = self.prepare_second_pass(slots, before, after)
            finish(read_scalars(scalars))
            return False, loss_after
        self.set_grad_scales(after)
        sums: list[torch.Tensor] = []
        rows: list[float] = []
        layout: list[tuple[str, list[int]]] = []
        for name in users:
            b, a = before[name], after[name]
            idx = []
            for rec_rows, mean_of in ((b.h_rows, None), (a.h_rows, None), (b.grad_rows, b), (a.grad_rows, a),
                                      (b.input_rows, None)):
                if rec_rows is None:
                    idx.append(-1)
                    continue
                s = rec_rows.sum(0)
                if mean_of is not None:
                    s = s * mean_of.grad_scale
                idx.append(len(sums))
                sums.append(s)
                rows.append(float(rec_rows.shape[0]))
            layout.append((name, idx))
        control = torch.tensor([1.0 if bad else 0.0, 0.0 if (bad or loss_after is None) else float(loss_after)] + rows,
                               dtype=torch.float64, device=self.comm.device)
        reduced = self.comm.all_reduce_sum(sums + [control])
        total = reduced[-1].tolist()
        any_bad = total[0] > 0
        mean_loss = None if (loss_after is None or any_bad) else total[1] / self.world_size
        if any_bad:
            return True, mean_loss
        means = [reduced[i] / total[2 + i] for i in range(len(sums))]
        for name, idx in layout:
            if not self.owns(name):
                continue
            b, a = before[name], after[name]
            pick = [None if i < 0 else means[i][None, :] for i in idx]
            gb, ga = LayerRecord(h_rows=pick[0]), LayerRecord(h_rows=pick[1])
            if pick[2] is not None:
                gb.g_rows = pick[2]
            if pick[3] is not None:
                ga.g_rows = pick[3]
            if pick[4] is not None:
                gb.input_rows, gb.has_bias = pick[4], b.has_bias
            gb.batch_size = ga.batch_size = 1
            slots[name].block.update_after_step(gb, ga)
        if self.distribute == "layerwise":
            self._broadcast_block_states(slots, users)
        return False, mean_loss

    def _broadcast_block_states(self, slots: Mapping[str, Any], names: Sequence[str]) -> None:
        for src in range(self.world_size):
            owned = [n for n in names if self.owners[n] == src]
            if not owned:
                continue
            payload = {n: slots[n].block.state_dict() for n in owned} if self.rank == src else None
            payload = self.comm.broadcast_object(payload, src)
            if self.rank != src:
                for n in owned:
                    slots[n].block.load_state_dict(payload[n])

    # ------------------------------------------------------------------ state
    def check_replicated(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` are bit-identical on every rank (a debugging aid and test oracle:
        compares each rank's bytes with rank 0's through one broadcast)."""
        if not self.active:
            return True
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).to(self.comm.device)
        mine = flat.clone()
        self.comm.broadcast_from_owners([flat], [0])
        equal = bool(torch.equal(flat, mine) or (torch.isnan(flat).any() and torch.equal(
            torch.nan_to_num(flat, nan=0.0), torch.nan_to_num(mine, nan=0.0))))
        return not self.comm.any_true(not equal)[0]


class LayerInverter:
    """A :class:`~curvature.inverter.BatchedInverter` front end that knows which layer is asking.

    ``for_layer(name)`` returns an object with ``request(matrix, damping, callback)``. With
    "replicate" (or one process) requests go straight to the base inverter. With "layerwise" only
    the owner computes a request; :meth:`run` then broadcasts all results (one flat buffer per owner
    and dtype) and calls every callback on every rank, so all ranks end with identical inverses.
    An inversion failure on any rank raises :class:`~curvature.linalg.InversionError` on every rank
    before any callback ran.
    """

    def __init__(self, dp: DataParallel, base: BatchedInverter) -> None:
        self.dp, self.base = dp, base
        self.layerwise = dp.active and dp.distribute == "layerwise"
        self._pending: list[tuple[torch.Tensor, int, Callable[[torch.Tensor], None], list]] = []

    def for_layer(self, name: str):
        if not self.layerwise:
            return self.base
        return _OwnedRequests(self, self.dp.owners[name])

    def run(self) -> int:
        if not self.layerwise:
            return self.base.run()
        error: str | None = None
        try:
            self.base.run()
        except InversionError as exc:
            error = str(exc)
        failed_any = self.dp.comm.any_true(error is not None)[0]
        if failed_any:
            where = error if error is not None else "on another rank"
            raise InversionError(f"a damped factor inverse failed ({where}); no inverse was updated")
        results = []
        for matrix, owner, _, box in self._pending:
            results.append(box[0] if owner == self.dp.rank else torch.empty_like(matrix))
        self.dp.comm.broadcast_from_owners(results, [owner for _, owner, _, _ in self._pending])
        for (_, _, callback, _), result in zip(self._pending, results):
            callback(result)
        n = len(self._pending)
        self._pending = []
        return n


class _OwnedRequests:
    def __init__(self, parent: LayerInverter, owner: int) -> None:
        self.parent, self.owner = parent, owner

    def request(self, matrix: torch.Tensor, damping: float, callback: Callable[[torch.Tensor], None],
                on_failure: Callable[[float], float | None] | None = None) -> None:
        """Queue ``matrix`` for its owner. ``on_failure`` (the factor's inversion recovery) is not
        used here: it changes the factor's state on the owner alone, so in "layerwise" mode a failed
        inversion raises :class:`~curvature.linalg.InversionError` on every rank instead (see
        :meth:`LayerInverter.run`); "replicate" mode recovers as a single process does."""
        box: list = [None]
        self.parent._pending.append((matrix, self.owner, callback, box))
        if self.owner == self.parent.dp.rank:
            self.parent.base.request(matrix, damping, lambda inverse, box=box: box.__setitem__(0, inverse))


def all_reduce_gradients(model: nn.Module, comm: Communicator) -> None:
    """Average the gradients of ``model``'s trainable parameters over ranks, as DDP does (one coalesced
    all-reduce per dtype), for a plain module trained without ``DistributedDataParallel``.

    Parameters that do not require grad are skipped, so inside the optimizer's frozen passes
    (K-BFGS's second pass) this issues nothing. A parameter without a gradient on this rank
    contributes zeros and receives the average.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not comm.distributed or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    summed = comm.all_reduce_sum(grads)
    for p, g in zip(params, summed):
        g.div_(comm.world_size)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
