"""Separate-then-select target-speaker extraction: a trained separator splits the mixture into
its sources, and the source whose GE2E d-vector (:class:`modules.models.speaker.GE2EEncoder`)
is closest in cosine to the enrolment's is returned. Nothing is trained.

Usage::

    from modules.serving.select import SeparateThenSelect
    tse = SeparateThenSelect.from_separator("<separator folder or HF id>", savedir="pretrained/x")
    est = tse.extract_file("mixture.wav", "enrollment.wav", output_dir="out/")  # [1, time]
    est = tse.extract_batch(mix, enroll, mix_lens, enroll_lens)              # [batch, time]

The interface is the one of :class:`modules.serving.inference.TargetSpeakerExtractor`; long
mixtures are separated in chunks as :class:`~modules.serving.inference.Separator` does, and the
selection is made once over the whole mixture.
"""

from __future__ import annotations

import torch

from modules.data.audio import AudioError
from modules.models.speaker import GE2EEncoder
from modules.serving.inference import Separator, TargetSpeakerExtractor


class SeparateThenSelect(torch.nn.Module):
    """A :class:`Separator` and a :class:`GE2EEncoder` (built at the separator's rate when not
    given) used as a target-speaker extractor. It is a module with the trained extractors'
    ``forward(mix, enroll, mix_lens, enroll_lens)``, so the extraction recipe can test it on its
    test sets (``recipes/target_speaker/hparams/separate_then_select.yaml``)."""

    def __init__(self, separator: Separator, encoder: GE2EEncoder | None = None):
        super().__init__()
        self.separator = separator
        if encoder is None:
            encoder = GE2EEncoder(sample_rate=separator.sample_rate)
        if encoder.sample_rate != separator.sample_rate:
            raise ValueError(f"the speaker encoder takes {encoder.sample_rate} Hz but the separator "
                             f"gives {separator.sample_rate} Hz; build GE2EEncoder(sample_rate="
                             f"{separator.sample_rate})")
        self.encoder = encoder.to(separator.device).eval()

    @classmethod
    def from_separator(cls, source, savedir=None, encoder: GE2EEncoder | None = None, **kwargs):
        """Load the separator folder ``source`` (``Separator.from_hparams`` arguments in
        ``kwargs``) and wrap it."""
        return cls(Separator.from_hparams(source=source, savedir=savedir, **kwargs), encoder)

    @property
    def sample_rate(self) -> int:
        return self.separator.sample_rate

    def read(self, path, channel=None):
        return self.separator.read(path, channel)

    output_stem = staticmethod(Separator.output_stem)

    @torch.no_grad()
    def select_batch(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None, enroll_lens=None):
        """``mix [batch, time]``, ``enroll [batch, time']`` at ``sample_rate`` (relative lengths
        optional) -> ``(target [batch, time], scores [batch, n_src], choice [batch])``: the
        chosen source (zero beyond each mixture's length), the cosine of every source's d-vector
        with the enrolment's, and the index of the chosen source."""
        sep = self.separator
        mix = sep.check_input(mix, "mixture", sep.min_samples, "extract_file", "one encoder frame")
        enroll = sep.check_input(enroll, "enrolment", 1, "extract_file")
        if mix.shape[0] != enroll.shape[0]:
            raise AudioError(f"{mix.shape[0]} mixtures but {enroll.shape[0]} enrolments; give one "
                             "enrolment per mixture")
        est = sep.separate_batch(mix)                                     # [batch, time, n_src]
        b, t, n_src = est.shape
        if mix_lens is not None:
            n = torch.round(torch.as_tensor(mix_lens, device=est.device).float() * t)
            est = est * (torch.arange(t, device=est.device)[None, :, None] < n[:, None, None])
        speaker = self.encoder(enroll, enroll_lens)                        # [batch, 256], cached
        sources = est.transpose(1, 2).reshape(b * n_src, t)
        lens = None if mix_lens is None else torch.as_tensor(mix_lens).float().repeat_interleave(n_src)
        emb = self.encoder(sources, lens, cache=False).view(b, n_src, -1)
        scores = (emb * speaker[:, None]).sum(-1)
        choice = scores.argmax(-1)
        return est[torch.arange(b, device=est.device), :, choice], scores, choice

    def extract_batch(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None,
                      enroll_lens=None) -> torch.Tensor:
        """``mix [batch, time]``, ``enroll [batch, time']`` -> target estimates ``[batch, time]``
        (see :meth:`select_batch`)."""
        return self.select_batch(mix, enroll, mix_lens, enroll_lens)[0]

    def forward(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None, enroll_lens=None) -> torch.Tensor:
        return self.extract_batch(mix, enroll, mix_lens, enroll_lens)

    # reading, resampling, error context and writing exactly as the trained extractors do; it
    # needs only read / extract_batch / sample_rate / output_stem of this class
    extract_file = TargetSpeakerExtractor.extract_file
