"""Training data: read rows, tokenize once, and plan length-aware token-budget micro-batches.

The batch plan of an epoch is a pure function of (seed, epoch, sample lengths, budget) and is the same
on every rank. So the data position worth checkpointing is one number — how many micro-batches of the
epoch are consumed — and every rank knows, without communication, how many samples and tokens the
whole step holds (the loss denominator for exact token/sample weighting under DDP).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch

from kubetrain.api import DataSpec

from .failures import DataError, one_line
from .storage import read_uri_bytes

__all__ = ["DataError"]  # defined with the other permanent failures; raised from here


IGNORE_LABEL = -100  # cross_entropy's ignore_index


class Ragged:
    """Rows of different lengths as one flat array and row offsets: a token costs 4 bytes (int32), or 1 for a
    mask, where a Python list of ints costs about 36; a batch is gathered or padded from it in a few numpy
    calls, so nothing is padded ahead of time."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence], dtype) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=dtype)
        for r, start, end in zip(rows, offsets[:-1], offsets[1:]):
            flat[start:end] = r
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        """Row i (a view); a slice gives a list of rows."""
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_sums(self) -> np.ndarray:
        if not len(self.flat):
            return np.zeros(len(self), dtype=np.int64)
        return np.add.reduceat(self.flat.astype(np.int64), self.offsets[:-1])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows `indices`, end to end."""
        lengths = self.lengths[indices]
        starts = np.repeat(self.offsets[indices] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return self.flat[starts + np.arange(int(lengths.sum()))]

    def padded(self, indices: Sequence[int], width: int, fill) -> np.ndarray:
        """Rows `indices` right-padded (or cut) to `width`, as [len(indices), width]."""
        idx = np.asarray(indices, dtype=np.int64)
        cols = np.arange(width)
        inside = cols[None, :] < self.lengths[idx][:, None]
        if not len(self.flat):
            return np.full((len(idx), width), fill, dtype=self.flat.dtype)
        source = np.minimum(self.offsets[idx][:, None] + cols[None, :], len(self.flat) - 1)
        return np.where(inside, self.flat[source], np.asarray(fill, dtype=self.flat.dtype))


@dataclass(frozen=True)
class Encoded:
    """A tokenized split: one entry per sample; labels where the task has them (classification); for causal-LM
    rows whose loss counts only some tokens (completions, assistant turns), which tokens are trained (a bool
    per token, never a sample's first: nothing predicts it). None: every token but the first.

    Token rows are stored Ragged (lists given here are converted): a split of a billion tokens is 4 GB."""

    input_ids: Ragged
    token_type_ids: Ragged | None
    labels: list[int] | None
    trained: Ragged | None = None

    def __post_init__(self):
        for name, dtype in (("input_ids", np.int32), ("token_type_ids", np.int8), ("trained", np.bool_)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Ragged):
                object.__setattr__(self, name, Ragged.from_rows(value, dtype))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.input_ids.lengths


def data_format(uri: str, fmt: str = "auto") -> str:
    """spec.data.format, or what the name says: .csv, .parquet, a directory (a saved datasets.Dataset), else JSONL."""
    if fmt != "auto":
        return fmt
    name = uri.lower().rstrip("/")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if "://" not in uri and Path(uri).is_dir():
        return "hf-dataset"
    return "jsonl"


def read_rows(uri: str, fmt: str = "auto", *, endpoint: str | None = None, region: str | None = None) -> list[dict]:
    """Rows of a JSONL, CSV or Parquet file at a local path or s3:// URI, or of a local datasets directory."""
    fmt = data_format(uri, fmt)
    if fmt == "hf-dataset":
        return arrow_rows(dataset_tables(Path(uri)), uri)
    if fmt == "parquet":
        return arrow_rows([parquet_table(read_uri_bytes(uri, endpoint=endpoint, region=region), uri)], uri)
    raw = decode_utf8(read_uri_bytes(uri, endpoint=endpoint, region=region), uri)
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(raw)))
    rows = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{uri} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{uri} line {n}: expected a JSON object")
        rows.append(row)
    return rows


def parquet_table(raw: bytes, uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{uri}: not a readable Parquet file ({one_line(err, 200)})") from None


def dataset_tables(path: Path) -> list:
    """The Arrow tables of a directory written by `datasets.Dataset.save_to_disk` (state.json names its files,
    Arrow IPC streams), memory-mapped; read with pyarrow alone (no datasets, nothing unpickled)."""
    import pyarrow as pa

    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: a data directory must be a saved datasets.Dataset (state.json missing); a DatasetDict "
                        f"holds one per split: name the split's directory")
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{state}: not a datasets state file ({one_line(err, 200)})") from None
    tables = []
    for name in names:
        file = path / name
        if file.parent != path or not file.is_file():
            raise DataError(f"{path}: state.json names {name!r}, which is not a file of this directory")
        try:
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except pa.ArrowException as err:
            raise DataError(f"{file}: not an Arrow stream ({one_line(err, 200)})") from None
    return tables


def arrow_rows(tables: list, uri: str) -> list[dict]:
    rows = [row for table in tables for row in table.to_pylist()]
    if not rows:
        raise DataError(f"{uri}: no rows")
    return rows


def decode_utf8(raw: bytes, uri: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{uri} line {line}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})") from None


def require_fields(rows: Sequence[dict], fields: dict[str, str | None], uri: str, text: Sequence[str] = ()) -> None:
    """Every row has every configured field (spec.data key -> column name; None: not configured), and the
    columns named by the `text` keys hold strings."""
    if not rows:
        raise DataError(f"{uri}: no rows")
    for n, row in enumerate(rows, start=1):
        for key, field in fields.items():
            if not field:
                continue
            if field not in row:
                raise DataError(f"{uri} row {n}: missing field {field!r} (spec.data.{key})")
            if key in text and not isinstance(row[field], str):
                raise DataError(f"{uri} row {n}: field {field!r} is {type(row[field]).__name__}, not text (spec.data.{key})")


def pack_by_budget(order: Sequence[int], lengths: np.ndarray, max_tokens: int, max_samples: int | None,
                   packed: bool = False) -> list[list[int]]:
    """Greedy batching in `order`: each batch as full as samples x longest <= max_tokens (padded), or
    as the sum of lengths <= max_tokens (packed: no padding)."""
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = total = 0
    for i in order:
        length = int(lengths[i])
        longest_if_added, total_if_added = max(longest, length), total + length
        cost = total_if_added if packed else (len(batch) + 1) * longest_if_added
        full = cost > max_tokens or (max_samples and len(batch) >= max_samples)
        if batch and full:
            batches.append(batch)
            batch, longest_if_added, total_if_added = [], length, length
        batch.append(int(i))
        longest, total = longest_if_added, total_if_added
    if batch:
        batches.append(batch)
    return batches


def plan_epoch(lengths: np.ndarray, max_tokens: int, max_samples: int | None, seed: int, epoch: int, window_batches: int = 64,
               packed: bool = False) -> list[list[int]]:
    """The epoch's micro-batches: shuffle, sort by length within windows, pack, shuffle batch order.

    Sorting inside windows (not globally) keeps batches random across the epoch while grouping
    similar lengths, so padding stays low; it is the same idea as HF's group_by_length megabatches.
    Packed batches have no padding, so they are filled in shuffled order, unsorted.
    """
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    order = rng.permutation(len(lengths))
    if packed:
        return pack_by_budget(order, lengths, max_tokens, max_samples, packed=True)
    mean_len = max(1.0, float(lengths.mean()))
    window = max(1, int(window_batches * max_tokens / mean_len))
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(pack_by_budget(chunk, lengths, max_tokens, max_samples))
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_fixed_steps(lengths: np.ndarray, batch_size: int, micro_per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """training.batchSize: each step is `batch_size` shuffled samples (a tail short of a step is dropped), split
    into `micro_per_step` micro-batches whose sizes differ by at most one; sorted by length within the step, so
    each micro-batch holds similar lengths (little padding), and dealt to the ranks in a shuffled order (which
    rank gets the longest varies). The plan is the step plan: every `micro_per_step` micro-batches are a step."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    order = rng.permutation(len(lengths))
    plan: list[list[int]] = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        step = order[start : start + batch_size]
        step = step[np.argsort(-lengths[step], kind="stable")]
        parts = np.array_split(step, micro_per_step)
        plan.extend([int(i) for i in parts[k]] for k in rng.permutation(micro_per_step))
    return plan


def plan_eval(lengths: np.ndarray, max_tokens: int, max_samples: int | None) -> list[list[int]]:
    """Eval batches: globally sorted (no randomness needed), so padding is minimal."""
    return pack_by_budget(np.argsort(-lengths, kind="stable"), lengths, max_tokens, max_samples)


@dataclass(frozen=True)
class StepBatches:
    """What one optimizer step consumes: this rank's micro-batches plus global counts."""

    micro_batches: list[list[int]]
    global_samples: int
    global_tokens: int  # real (non-pad) tokens
    global_targets: int  # loss denominator (Task.sample_targets): samples, or trained tokens
    global_padded: int  # tokens fed to the model, pads included
    fingerprint: str = ""  # of the whole step's sample indices in order: data order is auditable from logs


def fingerprint(group: Sequence[Sequence[int]]) -> str:
    """8 hex digits naming which samples a step trains on, in which order and micro-batches."""
    return hashlib.blake2s(repr([[int(i) for i in b] for b in group]).encode(), digest_size=4).hexdigest()


class TrainSchedule:
    """Maps a global optimizer step to micro-batches; the checkpointed position is (epoch, cursor)."""

    def __init__(self, encoded: Encoded, spec: DataSpec, task, seed: int, world_size: int, grad_accum: int,
                 batch_size: int | None = None):
        self.lengths = encoded.lengths
        self.targets = task.sample_targets(encoded)  # the loss denominator's share of each sample
        self.spec, self.task, self.seed = spec, task, seed
        self.world_size, self.grad_accum = world_size, grad_accum
        self.batch_size = batch_size  # training.batchSize: samples per step; None: steps sized by the token budget
        self._plans: dict[int, list[list[int]]] = {}

    @property
    def micro_per_step(self) -> int:
        return self.world_size * self.grad_accum

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            if self.batch_size:
                plan = plan_fixed_steps(self.lengths, self.batch_size, self.micro_per_step, self.seed, epoch)
            else:
                plan = plan_epoch(self.lengths, self.spec.max_tokens_per_batch, self.spec.max_samples_per_batch,
                                  self.seed, epoch, packed=self.spec.packing)
            self._plans = {epoch: plan}
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int, cursor: int = 0) -> int:
        """Full steps left from cursor; a tail smaller than one step is dropped (drop_last)."""
        return (len(self.plan(epoch)) - cursor) // self.micro_per_step

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        whole = int(epochs)
        total = sum(self.steps_in_epoch(e) for e in range(whole))
        if epochs > whole:
            total += math.floor((epochs - whole) * self.steps_in_epoch(whole))
        if total < 1 and self.batch_size:
            raise DataError(f"the training data gives no full optimizer step: {len(self.lengths)} samples < "
                            f"training.batchSize {self.batch_size}")
        if total < 1:
            raise DataError(
                f"the training data gives no full optimizer step: {len(self.plan(0))} micro-batches per epoch "
                f"< nodes x procsPerNode x gradientAccumulation = {self.micro_per_step}"
            )
        return total

    def step(self, epoch: int, cursor: int, rank: int) -> StepBatches:
        group = self.plan(epoch)[cursor : cursor + self.micro_per_step]
        samples = sum(len(b) for b in group)
        tokens = int(sum(self.lengths[i] for b in group for i in b))
        targets = int(sum(self.targets[i] for b in group for i in b))
        padded = tokens if self.spec.packing else sum(len(b) * int(self.lengths[b].max()) for b in group)
        mine = group[rank * self.grad_accum : (rank + 1) * self.grad_accum]
        return StepBatches(mine, samples, tokens, max(1, targets), padded, fingerprint(group))


def next_token_targets(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Each position's target: the next token where the loss counts it, IGNORE_LABEL elsewhere. Works on padded
    [rows, width] arrays and on packed rows alike: a sample's first token is never trained, so no position
    targets the next sample."""
    out = np.full(ids.shape, IGNORE_LABEL, dtype=np.int64)
    out[..., :-1] = np.where(trained[..., 1:], ids[..., 1:], IGNORE_LABEL)
    return out


def collate(encoded: Encoded, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad one micro-batch to its longest sample."""
    idx = np.asarray(indices, dtype=np.int64)
    lengths = encoded.lengths[idx]
    width = int(lengths.max())
    ids = encoded.input_ids.padded(idx, width, pad_id).astype(np.int64)
    batch = {"input_ids": torch.from_numpy(ids),
             "attention_mask": torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.int64))}
    if encoded.token_type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(encoded.token_type_ids.padded(idx, width, 0).astype(np.int64))
    if encoded.labels is not None:
        batch["labels"] = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    if encoded.trained is not None:
        batch["labels"] = torch.from_numpy(next_token_targets(ids, encoded.trained.padded(idx, width, False)))
    return batch
