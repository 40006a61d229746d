"""A callback for the preemption test: the process sends itself SIGTERM after step ``step``."""

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
