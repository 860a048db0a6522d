"""Corpora: the embedded synthetic corpus, loaders for real corpora, and speaker partitions."""

from fl_ser.data.corpus import EMOTIONS, SAMPLE_RATE, Corpus, CorpusError, LoadReport, Utterance

__all__ = ["EMOTIONS", "SAMPLE_RATE", "Corpus", "CorpusError", "LoadReport", "Utterance"]
