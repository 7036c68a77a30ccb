"""Lightning pieces the DDP test hands to spawned processes, so at module scope (pickled by name)."""
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from orchestrator.integrations.lightning import TableBatchSize
from tiny_models import Tiny

class Module(pl.LightningModule):
    """tests/tiny_models.Tiny on random 3x8x8 images, reading ``batch_size`` in its dataloader; records
    each training batch's size."""

    def __init__(self):
        super().__init__()
        self.net, self.batch_size, self.seen = Tiny(), None, []

    def training_step(self, batch, _):
        self.seen.append(len(batch[0]))
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        n = 2048  # above any answer the tests' tables give, so that a batch's size is the batch_size
        return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,))),
                          batch_size=self.batch_size)


class Data(pl.LightningDataModule):
    """The same data from a datamodule that holds ``batch_size`` (the module then has none)."""

    def __init__(self):
        super().__init__()
        self.batch_size = None

    def train_dataloader(self):
        n = 2048
        return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,))),
                          batch_size=self.batch_size)


class CardPerRank(TableBatchSize):
    """Rank k reads ``cards[k]``: the hardware, faked (on a GPU node each rank reads its own device, gpu=None)."""

    def __init__(self, cards, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cards = cards

    def card(self, trainer):
        return self.cards[trainer.global_rank]


class Record(pl.Callback):
    """Each rank writes the batch sizes its module trained with to ``out/RANK.json``."""

    def __init__(self, out):
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module):
        (self.out / f"{trainer.global_rank}.json").write_text(json.dumps(pl_module.seen))
