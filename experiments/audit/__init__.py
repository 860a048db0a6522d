"""The privacy and robustness audit: attack an experiment the way an adversary would (``python -m experiments.audit``).

One module per attack, over one in-process federation harness:

* :mod:`~experiments.audit.federation`: the devices' own update code and Flower's own strategies, without the
  messaging (checked against the simulation engine's checkpoints);
* :mod:`~experiments.audit.attribute`: a speaker's sex from single updates, cohort sums, a malicious server's
  difference of sums, and the release (Feng et al. 2021/2022);
* :mod:`~experiments.audit.membership`: loss and LiRA membership inference on the release (Carlini et al. 2022);
* :mod:`~experiments.audit.canary`: an empirical lower bound on epsilon beside the accountant's (Jagielski et al.
  2020; Nasr et al. 2021);
* :mod:`~experiments.audit.poisoning`: label flipping, scaled updates and a backdoor against clipping, DP and
  Flower's robust strategies;
* :mod:`~experiments.audit.adversarial`: PGD on the release's waveform input at a given SNR;
* :mod:`~experiments.audit.stats` and :mod:`~experiments.audit.report`: the figures, their intervals, the report.
"""
