"""The device's own privacy policy, enforced by the device on every request; the server is never trusted with it.

A :class:`DevicePolicy` says how private anything that leaves this device must
be: the lifetime sample-level budget and delta, the least DP-SGD noise, the
largest per-sample clipping norm and whether that noise must come from the
vetted sampler, which feature normalisations are acceptable,
the largest update norm, the least user-level noise share (distributed
placement), whether updates may leave only under SecAgg+ and in cohorts of at
least how many devices, whether DP-SGD's noise may be distributed (each device
adding only its share under SecAgg+, :mod:`fl_ser.privacy.distributed`), and
whether the device may report its accuracy on its own data after the release.
With ``privacy.dp_sgd.target_epsilon`` the device computes its noise multiplier
itself (:mod:`fl_ser.privacy.budget`): the target may not exceed its budget, and
the noise it gives may not fall below the policy's minimum
(:meth:`DevicePolicy.check_noise_multiplier`).

Where it comes from: in simulation, from the experiment config (the device's
own configuration). On a SuperNode, from a policy file (node config
``policy-file=PATH``, else ``device-dir/privacy_policy.yaml`` when present);
every setting the file leaves out defaults to the experiment's, so the
effective policy is never weaker than what the experiment asked for.
Everything the server sends is then checked against it:

* the experiment itself (DP-SGD noise, clipping, delta, normalisation,
  aggregation) on every training message;
* the SecAgg+ setup (cohort size, a reconstruction threshold above half the
  shares, as SecAgg's security against a server lying about dropouts needs);
* each round's clipping norm and user-level noise share.

A request that is weaker is refused with
:class:`~fl_ser.privacy.refusals.PolicyRefused`: the device sends nothing but
the fixed public code and logs the reason locally. :func:`policy_guard_mod`
(outside SecAgg+) does the checks; :func:`update_privacy_mod` (inside it,
around local training) clips the update and adds the device's noise share
with the settings the guard approved, never with unchecked server values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from fl_ser.privacy.boundary import SECAGG
from fl_ser.privacy.refusals import PolicyRefused
from fl_ser.protocol import CKKS_RECORD, KEY_CLIPPING_NORM, KEY_DEVICE_NOISE_STD, SECURE_AGGREGATIONS

log = logging.getLogger("fl_ser.device")

POLICY_FILE = "privacy_policy.yaml"
FIT_CONFIG = "fitins.config"
#: Relative slack when comparing a server's float (e.g. a noise std it computed) with the policy's own value.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class DevicePolicy:
    """What this device requires; ``None`` for a sample-level budget means sample-level DP is not required."""

    epsilon_budget: float | None = None  # lifetime sample-level epsilon of any one utterance
    delta: float = 1e-5  # the largest delta the device accepts
    min_noise_multiplier: float = 0.0  # DP-SGD
    max_grad_norm: float = math.inf  # DP-SGD per-sample clipping
    vetted_noise: bool = False  # DP-SGD noise only from the vetted sampler (fl_ser.privacy.noise)
    normalization: tuple[str, ...] = ("public", "dp", "utterance", "local")
    min_normalization_noise: float = 0.0  # privacy.normalization.mode=dp
    max_update_norm: float | None = None  # the update clipping norm C; None: unclipped updates may leave
    min_user_noise_multiplier: float = 0.0  # distributed user-level noise: this device's share, as z
    secure_aggregation: bool = False  # updates leave only SecAgg+-masked or CKKS-encrypted
    min_cohort: int = 2  # SecAgg+ cohorts smaller than this are refused; distributed noise calibrates to it
    device_report: bool = True  # may send its accuracy with the released model
    placements: tuple[str, ...] = ("local", "distributed")  # DP-SGD noise: on the device alone, or shared (SecAgg+)

    def __post_init__(self):
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise ValueError(f"policy epsilon_budget must be positive, got {self.epsilon_budget}")
        if not 0 < self.delta < 1:
            raise ValueError(f"policy delta must be in (0, 1), got {self.delta}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"policy max_update_norm must be positive, got {self.max_update_norm}")
        if self.min_cohort < 2:
            raise ValueError(f"policy min_cohort must be at least 2, got {self.min_cohort}")

    # -- the experiment -----------------------------------------------------
    def violations(self, cfg) -> list[str]:
        """How the experiment ``cfg`` is weaker than this policy (empty: it complies)."""
        priv, out = cfg.privacy, []
        dp = priv.dp_sgd
        if self.epsilon_budget is not None:
            if not dp.enabled:
                out.append("sample-level DP is off (privacy.dp_sgd.enabled=false), the device requires it")
            else:
                target = dp.get("target_epsilon")
                if target is not None and float(target) > self.epsilon_budget * (1 + TOLERANCE):
                    out.append(f"target_epsilon {target} > the device's budget {self.epsilon_budget}")
                if target is None and float(dp.noise_multiplier) < self.min_noise_multiplier * (1 - TOLERANCE):
                    out.append(f"DP-SGD noise_multiplier {dp.noise_multiplier} < the device's minimum "
                               f"{self.min_noise_multiplier}")
                where = str(dp.get("placement", "local"))
                if where not in self.placements:
                    out.append(f"DP-SGD noise placement {where!r} is not one the device accepts "
                               f"({', '.join(self.placements)}): a distributed share alone protects less")
                if float(dp.max_grad_norm) > self.max_grad_norm * (1 + TOLERANCE):
                    out.append(f"DP-SGD max_grad_norm {dp.max_grad_norm} > the device's maximum {self.max_grad_norm}")
                if float(dp.delta) > self.delta * (1 + TOLERANCE):
                    out.append(f"delta {dp.delta} > the device's maximum {self.delta}")
                if self.vetted_noise and not dp.vetted_noise:
                    out.append("DP-SGD noise from torch's generator (privacy.dp_sgd.vetted_noise=false); the device "
                               "requires the vetted sampler")
        mode = str(priv.normalization.mode)
        if mode not in self.normalization:
            out.append(f"normalisation {mode!r} is not one the device accepts ({', '.join(self.normalization)})")
        if mode == "dp" and float(priv.normalization.noise_multiplier) < self.min_normalization_noise:
            out.append(f"normaliser noise_multiplier {priv.normalization.noise_multiplier} < the device's minimum "
                       f"{self.min_normalization_noise}")
        if self.max_update_norm is not None:
            clip = priv.update_clipping
            if not clip.enabled:
                out.append("update clipping is off, the device requires it")
            elif float(clip.clipping_norm) > self.max_update_norm * (1 + TOLERANCE):
                out.append(f"update clipping norm {clip.clipping_norm} > the device's maximum {self.max_update_norm}")
        if self.min_user_noise_multiplier > 0:
            user = priv.user_level
            if str(user.placement) != "distributed" or float(user.noise_multiplier) < self.min_user_noise_multiplier:
                out.append(f"user-level noise {user.noise_multiplier} ({user.placement}) is less than the device's "
                           f"own share z={self.min_user_noise_multiplier} (distributed)")
        if self.secure_aggregation and str(cfg.aggregation.name) not in SECURE_AGGREGATIONS:
            out.append(f"aggregation={cfg.aggregation.name}: the device sends updates only under SecAgg+ or CKKS")
        return out

    def check_noise_multiplier(self, z: float) -> None:
        """The DP-SGD noise multiplier the device computed for a target epsilon, against the policy's minimum."""
        if z < self.min_noise_multiplier * (1 - TOLERANCE):
            raise PolicyRefused(f"the experiment's target epsilon gives DP-SGD noise multiplier {z:.4g} on this "
                                f"device, below its policy's minimum {self.min_noise_multiplier}")

    # -- each round's requests ---------------------------------------------------
    def clipping_norm(self, requested) -> float | None:
        """The update norm the device clips to: the server's, if the policy allows it (None: no clipping)."""
        if requested is None:
            return self.max_update_norm
        requested = float(requested)
        if self.max_update_norm is not None and not requested <= self.max_update_norm * (1 + TOLERANCE):
            raise PolicyRefused(f"the server asks for update clipping norm {requested}, above the device's maximum "
                                f"{self.max_update_norm}: its contribution would be less protected than the policy "
                                "allows")
        if not (math.isfinite(requested) and requested > 0):
            raise PolicyRefused(f"the server asks for an invalid update clipping norm {requested}")
        return requested

    def noise_std(self, requested, clipping_norm: float | None) -> float:
        """The std of the device's own user-level noise share; a request below the policy's share is refused."""
        if self.min_user_noise_multiplier <= 0:
            return float(requested or 0.0)
        if clipping_norm is None:
            raise PolicyRefused("the device adds a user-level noise share but its update is not clipped")
        own = self.min_user_noise_multiplier * clipping_norm / math.sqrt(self.min_cohort)
        if requested is None or not float(requested) >= own * (1 - TOLERANCE):
            raise PolicyRefused(f"the server asks for a user-level noise share of std {requested}, below the "
                                f"device's own {own:.6g} (z={self.min_user_noise_multiplier}, C={clipping_norm}, "
                                f"cohort {self.min_cohort})")
        return max(float(requested), own)

    def check_secagg_setup(self, configs) -> None:
        """The SecAgg+ setup: a large enough cohort, and a threshold above half of the shares."""
        sample, shares, threshold = (int(configs.get(k, 0)) for k in ("sample_num", "share_num", "threshold"))
        if sample < self.min_cohort:
            raise PolicyRefused(f"SecAgg+ cohort of {sample} devices, below the device's minimum {self.min_cohort}")
        if not 2 * threshold > shares:
            raise PolicyRefused(f"SecAgg+ reconstruction threshold {threshold} of {shares} shares is not above half: "
                                "a server could then recover both masks of a device")

    # -- sources -------------------------------------------------------------------
    @classmethod
    def from_experiment(cls, cfg, cohort: int | None) -> DevicePolicy:
        """The policy exactly as the experiment states it (simulation: the device's own configuration)."""
        priv = cfg.privacy
        dp, user = priv.dp_sgd, priv.user_level
        distributed = str(user.placement) == "distributed" and float(user.noise_multiplier) > 0
        return cls(
            epsilon_budget=float(dp.epsilon_budget) if dp.enabled else None,
            delta=float(dp.delta) if dp.enabled else 1e-5,
            min_noise_multiplier=float(dp.noise_multiplier) if dp.enabled and dp.get("target_epsilon") is None else 0.0,
            max_grad_norm=float(dp.max_grad_norm) if dp.enabled else math.inf,
            vetted_noise=bool(dp.enabled and dp.vetted_noise),
            normalization=(str(priv.normalization.mode),),
            min_normalization_noise=float(priv.normalization.noise_multiplier),
            max_update_norm=float(priv.update_clipping.clipping_norm) if priv.update_clipping.enabled else None,
            min_user_noise_multiplier=float(user.noise_multiplier) if distributed else 0.0,
            secure_aggregation=str(cfg.aggregation.name) in SECURE_AGGREGATIONS,
            min_cohort=max(int(cohort or 2), 2),
            device_report=bool(cfg.release.device_report),
            placements=(str(dp.get("placement", "local")),) if dp.enabled else ("local", "distributed"),
        )

    @classmethod
    def from_file(cls, path: str | Path, defaults: DevicePolicy) -> DevicePolicy:
        """The device's policy file; settings it leaves out are ``defaults``'s (the experiment's)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise PolicyRefused(f"the device's privacy policy {path} cannot be read ({err}); fix or remove it") \
                from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known) if isinstance(data, dict) else ["(not a mapping)"]
        if unknown:
            raise PolicyRefused(f"privacy policy {path}: unknown settings {unknown}; known: {sorted(known)}")
        for key in ("normalization", "placements"):
            if key in data:
                data[key] = tuple(data[key])
        try:
            return replace(defaults, **data)
        except (TypeError, ValueError) as err:
            raise PolicyRefused(f"privacy policy {path}: {err}") from None


def device_policy(cfg, node_config, device_dir: str | None, cohort: int | None) -> DevicePolicy:
    """The effective policy of this device (see the module docstring for where it comes from)."""
    base = DevicePolicy.from_experiment(cfg, cohort)
    if "policy-file" in node_config:
        return DevicePolicy.from_file(Path(str(node_config["policy-file"])).expanduser(), base)
    if device_dir is not None and (Path(device_dir) / POLICY_FILE).is_file():
        return DevicePolicy.from_file(Path(device_dir) / POLICY_FILE, base)
    return base


def clip_norm(update: list[np.ndarray], norm: float) -> list[np.ndarray]:
    """``update * min(1, norm / ||update||_2)`` in float64: its L2 norm over all layers at most ``norm``."""
    update = [np.asarray(u, dtype=np.float64) for u in update]
    total = math.sqrt(sum(float(np.sum(u * u)) for u in update))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return [u * scale for u in update]


def clip_update(new: list[np.ndarray], old: list[np.ndarray], norm: float) -> list[np.ndarray]:
    """``old + clip_norm(new - old)``: the update's L2 norm over all layers at most ``norm``."""
    update = clip_norm([np.asarray(n, dtype=np.float64) - np.asarray(o, dtype=np.float64)
                        for n, o in zip(new, old, strict=True)], norm)
    return [(np.asarray(o, dtype=np.float64) + u).astype(np.asarray(n).dtype)
            for n, o, u in zip(new, old, update, strict=True)]


def make_policy_mods(policy_of) -> tuple:
    """(guard, update) mods; ``policy_of(context)`` gives the device's effective :class:`DevicePolicy` and the
    experiment it checks."""
    from flwr.app.message_type import MessageType
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    def policy_guard_mod(msg, ctxt, call_next):
        if msg.metadata.message_type == MessageType.TRAIN:
            policy, cfg = policy_of(ctxt)
            wrong = policy.violations(cfg)
            if wrong:
                raise PolicyRefused("the experiment is weaker than this device's privacy policy: " + "; ".join(wrong))
            secagg = msg.content.config_records.get(SECAGG)
            if secagg is None and CKKS_RECORD not in msg.content.config_records and policy.secure_aggregation:
                raise PolicyRefused("the server asks for an unmasked update; the device sends updates only under "
                                    "SecAgg+ or CKKS")
            if secagg is not None and secagg.get("stage") == "setup":
                policy.check_secagg_setup(secagg)
            config = msg.content.config_records.get(FIT_CONFIG)
            if config is not None:  # the round's own requests, checked before any training
                norm = policy.clipping_norm(config.get(KEY_CLIPPING_NORM))
                policy.noise_std(config.get(KEY_DEVICE_NOISE_STD), norm)
        return call_next(msg, ctxt)

    def update_privacy_mod(msg, ctxt, call_next):
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        policy, _ = policy_of(ctxt)
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        norm = policy.clipping_norm(fit_ins.config.get(KEY_CLIPPING_NORM))
        std = policy.noise_std(fit_ins.config.get(KEY_DEVICE_NOISE_STD), norm)
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(fit_res.parameters)
        if norm is not None:
            arrays = clip_update(arrays, parameters_to_ndarrays(fit_ins.parameters), norm)
        if std > 0:
            from fl_ser.privacy.noise import add_gaussian

            arrays = add_gaussian(arrays, std)
        fit_res.parameters = ndarrays_to_parameters(arrays)
        reply.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
        log.debug("update clipped to %s, noise share std %s", norm, std)
        return reply

    return policy_guard_mod, update_privacy_mod
