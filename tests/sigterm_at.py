"""Callbacks for the preemption and Ctrl-C tests: the process sends itself SIGTERM
(or SIGINT, as Ctrl-C does) after step ``step``."""

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    signal_number = signal.SIGTERM

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal_number)


class SigintAt(SigtermAt):
    signal_number = signal.SIGINT
