"""fl-ser: private federated speech emotion recognition on Flower, Opacus and torchaudio.

Data flows one way: corpus (:mod:`fl_ser.data`) -> device partition -> on-device
features (:mod:`fl_ser.features`) -> local DP-SGD (:mod:`fl_ser.training`,
:mod:`fl_ser.privacy`) -> clipped, masked update (``clients/``) -> aggregate and
user-level noise (``server/``) -> evaluation (:mod:`fl_ser.metrics`) and release
(:mod:`fl_ser.models.export`) -> device inference (:mod:`fl_ser.models.runtimes`).
"""

__version__ = "0.1.0"
