"""Data mixtures: pretraining on several prepared data directories at once (`[data.mix]`), evaluated per source;
and the directories a run evaluates: its training data's and extra held-out sets (`[data.eval]`), never trained on.

Each row of a global batch comes from a source drawn with the sources' normalised weights by an RNG seeded with
(train.seed, global batch index) alone, so a resumed run draws the same sources without any saved RNG state. Each
source serves its blocks as a `PackedLoader` over it alone would (the same seeded permutation per epoch, the same
epoch length), cycling through its epochs independently of the other sources: a small source with a large weight
repeats its blocks more often. Every rank draws the whole global batch's sources and takes its own B rows of it,
so the W ranks' batches concatenated equal one process's batch of B*W, and the position saved (the global batch
and the blocks each source served) is the same on every rank and for any number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import fingerprint_tokenizer
from .distributed import World
from .errors import ConfigError, DataError, DataNotReady, is_integer
from .loader import PackedLoader, read_meta
from .metrics import perplexity
from .recorded_config import recorded_data_setting
from .run_config import RunConfig, TrainConfig
from .tokenizer import Tokenizer

# a third word in the draws' seeds keeps them apart from the permutations', seeded [seed, epoch]
_DRAW_STREAM = 0x6D6978


@dataclass(frozen=True)
class Mixture:
    """A data mixture: its sources' directories and weights as configured (`sources`: name -> {path, weight}, the
    paths absolute, as a checkpoint records them), the weights normalised to sum to 1 in `weights`."""

    sources: dict[str, dict[str, Any]]

    @property
    def paths(self) -> dict[str, Path]:
        return {name: Path(source["path"]) for name, source in self.sources.items()}

    @property
    def weights(self) -> dict[str, float]:
        total = sum(source["weight"] for source in self.sources.values())
        return {name: source["weight"] / total for name, source in self.sources.items()}


def recorded_mix(saved_run: Any) -> dict[str, Any]:
    """The data.mix a checkpoint's run trained on, from trainer_state.json's "config" ({} for one directory)."""
    mix = recorded_data_setting(saved_run, "mix")
    return mix if isinstance(mix, dict) else {}


def resolve_mixture(run: RunConfig, data_dir: str | None, saved_run: Any, checkpoint: Path | None,
                    announce: bool) -> Mixture | None:
    """The run's data mixture, or None for a run on one data directory. --data names one directory, and is refused
    beside a data.mix; a resumed mixture run given no data.mix, data.path or --data continues on the mixture its
    checkpoint records (as a one-directory run does on its directory), and one given its sources in another order
    takes the recorded order (the draws depend on it). Every source must be a prepared directory, and all must
    share one tokenizer: a row's ids mean the same tokens whichever source it came from."""
    mix, recorded = run.data.mix, recorded_mix(saved_run)
    if mix and data_dir:
        raise ConfigError(f"--data {data_dir} names one data directory, but the config sets a data.mix; drop --data "
                          f"(the mixture's sources name their directories) or data.mix")
    if recorded and not mix:
        if data_dir or run.data.path:
            raise ConfigError(f"{checkpoint} was trained on a data mixture ({', '.join(recorded)}): resume it with "
                              f"its data.mix, or without --data and data.path to continue on the sources it records")
        mix = recorded
        if announce:
            print(f"resuming on the data mixture the run was trained on: {_described(mix)}")
    if not mix:
        return None
    if set(mix) == set(recorded):  # TOML's key order is no part of a mixture: the draws keep the run's order
        mix = {name: mix[name] for name in recorded}
    mixture = Mixture({name: {"path": str(Path(source["path"]).resolve()), "weight": source["weight"]}
                       for name, source in mix.items()})
    check_tokenized_alike(mixture.paths, "data.mix source", "every source needs the same")
    return mixture


def check_tokenized_alike(paths: dict[str, Path], what: str, need: str, reference: Path | None = None) -> None:
    """Refuse a directory of `paths` (named `what` NAME in the refusal) that is not prepared, or was prepared with
    another tokenizer than `reference` (by default, the first of `paths`): its ids would mean other tokens."""
    def tokens(path: Path) -> tuple[str, int, str]:
        meta = read_meta(path / "meta.json")
        return fingerprint_tokenizer(Tokenizer.from_pretrained(path)), meta["vocab_size"], meta["dtype"]

    expected = (reference, tokens(reference)) if reference else None
    for name, path in paths.items():
        if not (path / "meta.json").is_file():
            raise DataNotReady(f"{what} {name!r}: {path} is not a prepared data directory (no meta.json); run "
                               f"scripts/prepare_data.py")
        found = tokens(path)
        expected = expected or (path, found)
        if found != expected[1]:
            raise ConfigError(f"{what} {name!r}: {path} was prepared with another tokenizer than {expected[0]} "
                              f"({need}: scripts/prepare_data.py --tokenizer {expected[0]})")


def _described(sources: dict[str, Any]) -> str:
    """'NAME (PATH, weight W), ...' of a data.mix or a loader state's sources."""
    return ", ".join(f"{name} ({source.get('path')}, weight {source.get('weight')!r})"
                     for name, source in sources.items())


class MixtureLoader:
    """`PackedLoader`'s interface over a mixture's sources (see the module docstring): `next()` gives the same
    batch dict, `state_dict()` / `load_state_dict()` the position, JSON-serializable and independent of the rank."""

    def __init__(self, mixture: Mixture, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.mixture, self.names = mixture, list(mixture.sources)
        self.sources = [PackedLoader(path, split, seq_len, batch_size, seed, rank, world_size)
                        for path in mixture.paths.values()]
        self.bounds = np.cumsum(list(mixture.weights.values()))
        self.seed, self.rank, self.batch_size, self.global_batch = seed, rank, batch_size, batch_size * world_size
        self.vocab_size = self.sources[0].vocab_size
        self.batch, self.served = 0, [0] * len(self.sources)  # the next global batch; blocks each source served

    def __iter__(self) -> "MixtureLoader":
        return self

    def draws(self, batch: int) -> np.ndarray:
        """The source of each row of global batch `batch`, a function of (seed, batch) alone."""
        uniform = np.random.default_rng([self.seed, batch, _DRAW_STREAM]).random(self.global_batch)
        # the weights' last cumulative sum may round below 1: a draw above it belongs to the last source
        return np.minimum(np.searchsorted(self.bounds, uniform, side="right"), len(self.sources) - 1)

    def _block(self, source: int, served: int) -> int:
        """The block a source serves after `served` others: its epochs are as long as a PackedLoader's over it."""
        loader = self.sources[source]
        epoch, index = divmod(served, loader.batches_per_epoch * self.global_batch)
        if loader.epoch != epoch:  # the permutation kept in the source's loader: one per source, as it holds alone
            loader.epoch, loader.order = epoch, loader.permutation(epoch)
        return int(loader.order[index])

    def __next__(self) -> dict[str, torch.Tensor]:
        draws, served = self.draws(self.batch), np.empty(self.global_batch, dtype=np.int64)
        # only the sources drawn are visited: a mixture of thousands of sources draws a few dozen per batch
        for source in np.unique(draws):  # each row's count of blocks its source served before it
            rows = np.flatnonzero(draws == source)
            served[rows] = self.served[source] + np.arange(len(rows))
            self.served[source] += len(rows)
        self.batch += 1
        mine = np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows, parts = [], []
        for source in np.unique(draws[mine]):
            taken = mine[draws[mine] == source]
            rows.append(taken)
            parts.append(self.sources[source].batch_of(np.array([self._block(source, served[i]) for i in taken])))
        order = torch.from_numpy(np.argsort(np.concatenate(rows), kind="stable"))  # back to the rows' order
        return {key: torch.cat([part[key] for part in parts])[order] for key in parts[0]}

    def state_dict(self) -> dict:
        """The position: the next global batch and the blocks each source served; the mixture and each source's
        block count, so a resume on other data or weights is refused."""
        first = self.sources[0].state_dict()
        return {"batch": self.batch, **{key: first[key] for key in ("seed", "seq_len", "global_batch", "world_size",
                                                                     "split")},
                "sources": {name: {**self.mixture.sources[name], "weight": self.mixture.weights[name],
                                   "n_blocks": loader.n_blocks, "served": served}
                            for name, loader, served in zip(self.names, self.sources, self.served)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` (on any number of ranks with the same global batch)."""
        saved, mine = state.get("sources"), self.state_dict()["sources"]
        if not isinstance(saved, dict):
            raise DataError("loader state: the run was trained on one data directory, not a data.mix; resume it "
                            "with its data.path or --data")
        if _described(saved) != _described(mine):
            raise DataError(f"the run was trained on the data mixture {_described(saved)}, this one is "
                            f"{_described(mine)} (weights normalised): resume with the run's own data.mix")
        for name, loader in zip(self.names, self.sources):
            try:  # PackedLoader's own checks of the seed, sequence length, global batch and blocks
                loader.load_state_dict({**state, "epoch": 0, "batch": 0, "n_blocks": saved[name].get("n_blocks")})
            except DataError as e:
                raise DataError(f"data.mix source {name!r}: {e}") from None
        served = [saved[name].get("served") for name in self.names]
        position = [state.get("batch"), *served]
        if not all(is_integer(n) and n >= 0 for n in position):
            raise DataError(f"loader state: batch {state.get('batch')!r} and blocks served {served} are no position "
                            f"(a damaged trainer_state.json?)")
        self.batch, self.served = state["batch"], served


def train_loader(data: Path | Mixture, train: TrainConfig, world: World) -> PackedLoader | MixtureLoader:
    """The training split's loader: of one data directory, or of a mixture."""
    kind = MixtureLoader if isinstance(data, Mixture) else PackedLoader
    return kind(data, "train", train.seq_len, train.micro_batch_size, seed=train.seed, rank=world.rank,
                world_size=world.size)


def resolve_eval_sets(run: RunConfig, data_path: Path, mixture: Mixture | None) -> dict[str, Path]:
    """The run's data.eval sets, by name, their directories made absolute (as checkpoints record them): each a
    prepared directory with the tokenizer of the training data (`data_path`, a mixture's first source), and named
    apart from the mixture's sources (the resumed run's mixture too), whose eval_loss/NAME it would overwrite."""
    clash = next((name for name in run.data.eval if mixture and name in mixture.sources), None)
    if clash is not None:
        raise ConfigError(f"data.eval set {clash!r} has the name of a data.mix source: both would log "
                          f"eval_loss/{clash}; rename the set")
    eval_sets = {name: Path(path).resolve() for name, path in run.data.eval.items()}
    check_tokenized_alike(eval_sets, "data.eval set", "an eval set needs the training data's", reference=data_path)
    return eval_sets


def evaluated_dirs(data_path: Path, mixture: Mixture | None, eval_sets: dict[str, Path]) -> dict[str, Path]:
    """The directories an evaluation scores, by name: the training data's ("" for one directory, a mixture's
    sources), then the held-out data.eval sets (`resolve_eval_sets`)."""
    return {**(mixture.paths if mixture else {"": data_path}), **eval_sets}


def check_eval_splits(evaluated: dict[str, Path], eval_sets: dict[str, Path], run: RunConfig, world: World) -> None:
    """`check_eval_split` of each directory `evaluated` (`evaluated_dirs`), where the run evaluates at all."""
    for name, path in evaluated.items() if run.train.eval_every else ():
        check_eval_split(path, run, world, eval_set=name if name in eval_sets else "")


def check_eval_split(data_path: Path, run: RunConfig, world: World, eval_set: str = "") -> None:
    """With evaluation on, val.bin must hold a global batch before any step is spent (it is first read at the
    first evaluation); a run with train.eval_every = 0 never opens it. `eval_set`: the name of a data.eval set,
    which the refusal names, and asks to drop instead of turning evaluation off."""
    where = f"data.eval set {eval_set!r}: " if eval_set else ""
    skip = "drop it from data.eval" if eval_set else "set train.eval_every=0 to train without evaluation"
    val = data_path / "val.bin"
    if not val.is_file() or val.stat().st_size == 0:
        what = "val.bin is empty" if val.is_file() else "no val.bin"
        raise DataNotReady(f"{where}{data_path} has no validation split ({what}); {skip}, or prepare "
                           f"{'it' if eval_set else 'the data'} with a --val-fraction that holds out documents"
                           f"{' (1: all)' if eval_set else ''}")
    try:
        val_loader(data_path, run, world)
    except DataError as e:  # the train split opened: this is the validation split's alone, and avoidable
        raise type(e)(f"{where}{e}; or {skip}") from None  # too small (DataNotReady) or damaged


def val_loader(data_path: Path, run: RunConfig, world: World) -> PackedLoader:
    """`data_path`'s val.bin as evaluations read it: global batches in file order, this rank's micro-batch of
    each."""
    return PackedLoader(data_path, "val", run.train.seq_len, run.train.micro_batch_size, rank=world.rank,
                        world_size=world.size, shuffle=False)


def eval_figures(losses: dict[str, float], mixture: Mixture | None) -> dict[str, float]:
    """An eval record's figures from the loss of each directory evaluated (`losses`: the training data's, "" for one
    directory or a mixture's sources by name, and the data.eval sets' by name). `eval_loss` and `eval_ppl` are the
    training data's, a mixture's the mean of its sources' losses weighted as the training draws them (the loss
    expected on the training distribution, whatever the sizes of their val splits); each named directory's own are
    eval_loss/NAME and eval_ppl/NAME, an eval set's counted in no other figure."""
    loss = math.fsum(weight * losses[name] for name, weight in (mixture.weights if mixture else {"": 1.0}).items())
    figures = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
    for name, value in losses.items():
        if name:  # the one training directory's are eval_loss and eval_ppl
            figures.update({f"eval_loss/{name}": value, f"eval_ppl/{name}": perplexity(value)})
    return figures
