"""On-device feature extractors and the normalisers that standardise their output.

Every extractor is a scriptable ``nn.Module`` mapping a float32 mono 16 kHz waveform
``[B, samples]`` to ``[B, *output_shape]``, with attributes ``output_shape`` and ``kind``
("sequence" for fixed-size time-frequency maps, "vector" for utterance-level functionals).
"""

from fl_ser.features.functionals import Functionals
from fl_ser.features.logmel import LogMel
from fl_ser.features.mfcc import MFCCDeltas
from fl_ser.features.normalize import FeatureNormalizer, UtteranceNormalizer

__all__ = ["FeatureNormalizer", "Functionals", "LogMel", "MFCCDeltas", "UtteranceNormalizer"]
