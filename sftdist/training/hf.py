"""What leaves a run as a Hugging Face directory: ``final/`` (the trained model, exported), and the meta files each
checkpoint's ``hf/`` holds so that ``sftdist-export`` of it writes the same. Both stop generation where the training
data's assistant turns end; the probes stop there too."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from sftdist import __version__
from sftdist.config import SFTConfig
from sftdist.data.report import DataReport
from sftdist.model import base_model_weights, checkpoint_dtype
from sftdist.parallel import Strategy
from sftdist.run.export import export_hf, export_lora, stop_token_ids, write_hf_meta
from sftdist.run.storage import write_error


class HFWriter:
    def __init__(self, cfg: SFTConfig, strategy: Strategy, model, tokenizer, data_report: DataReport):
        self.cfg, self.strategy, self.model, self.tokenizer = cfg, strategy, model, tokenizer
        self.data_report = data_report

    def export(self, out_dir: Path, scratch: Path, step: int | None = None) -> Path:
        """The Hugging Face directory of the trained model (weights gathered by the strategy: every rank calls it),
        in the dtype it came in: the same as ``sftdist-export`` of a checkpoint. With LoRA: the adapter there, and
        the merged model beside it (sftdist.run.export.export_lora). ``scratch``: where the meta files are made;
        ``step``: the step of the weights (default: train.max_steps)."""
        c = self.cfg.model
        state_dict = self.strategy.full_state_dict(self.model, trainable_only=c.lora.enabled)
        if self.strategy.is_main:
            try:
                with tempfile.TemporaryDirectory(dir=scratch, prefix=".hf-meta-") as meta:
                    self.write_meta(Path(meta), self.cfg.train.max_steps if step is None else step)
                    if c.lora.enabled:
                        base = functools.partial(base_model_weights, c, self.tokenizer, self.cfg.seed)
                        export_lora(Path(meta), state_dict, out_dir, c, base)
                    else:
                        export_hf(Path(meta), state_dict, out_dir, trust_remote_code=c.trust_remote_code)
            except Exception as err:
                refused = write_error("the export", out_dir, err, under=scratch)
                if refused is not None:  # (the checkpoint of the last step is there: sftdist-export writes it again)
                    raise refused from err
                raise
        return out_dir

    def write_meta(self, out_dir: Path, step: int) -> None:
        """Everything of the export but the weights: configs, tokenizer, sftdist_training.json."""
        r = self.data_report
        info = {
            "step": step,
            "template_hash": r.template_hash,
            "chat_template_kwargs": r.chat_template_kwargs,  # (a server must pass the same)
            "sftdist_version": __version__,
            "data_fingerprint": r.fingerprint,
            "tokenizer_hash": r.tokenizer_hash,
        }
        model = self.strategy.unwrap(self.model)
        write_hf_meta(model, self.tokenizer, out_dir, checkpoint_dtype(self.cfg.model), self.stop_tokens, info)

    @functools.cached_property
    def stop_tokens(self) -> list[int] | None:
        """The stop tokens an export writes: the trained end-of-turn token and the model's EOS (None: keep the
        model's own)."""
        return stop_token_ids(self.tokenizer, self.data_report.end_of_turn_ids, self._model_eos)

    @functools.cached_property
    def probe_stop_ids(self) -> list[int]:
        """Where a probe's answer ends: at the stop tokens an export writes, else at the tokenizer's EOS."""
        ids = self.stop_tokens if self.stop_tokens is not None else self._model_eos
        return ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    @functools.cached_property
    def _model_eos(self) -> list[int]:
        """The model's generation config's EOS tokens (none when it has none)."""
        current = getattr(getattr(self.strategy.unwrap(self.model), "generation_config", None), "eos_token_id", None)
        return [] if current is None else [current] if isinstance(current, int) else list(current)
