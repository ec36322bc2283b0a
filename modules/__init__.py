"""Speech separation, target-speaker extraction and timbre separation modules.

One file per model family (``tasnet``, ``stft_mask``), plus the shared maths (``losses``,
``metrics``), audio helpers (``audio``), data pipelines (``data``, ``synth``) and the Brain base
(``brain``) that every recipe subclasses.
"""

__version__ = "0.1.0"
