"""Speech separation, target-speaker extraction and timbre separation for SpeechBrain.

Sub-packages, lowest floor first (none imports one above it):

* ``modules.data``: audio I/O, corpora, on-the-fly mixing, published corpora, enrolments, music;
* ``modules.models``: the encoder-masker-decoder skeleton, losses and one file per model family;
* ``modules.convert``: ClearerVoice and fairseq checkpoints;
* ``modules.training``: the Brain base, checkpoints, time budget, metrics, allocator settings;
* ``modules.serving``: the Pretrained interfaces, export, model cards and command lines.
"""

__version__ = "0.1.0"
