"""fl-ser's entry points (train, simulation, deployment, lab, crossval, bench, soak).

Importing the package registers the config resolver ``fl_ser.if_set`` (``${fl_ser.if_set:VALUE,THEN,OTHERWISE}``):
``conf/config.yaml`` puts a resumed run's Hydra output in its own run dir (Hydra's log appends to its
``train.log``; Hydra's record of the resume goes to ``.hydra/resumed-TIME``, next to the first start's
``.hydra``), and a new run in ``outputs/DATE/TIME``. OmegaConf's ``oc.select`` would not do: it returns a key's
null as it is.
"""

from omegaconf import OmegaConf

if not OmegaConf.has_resolver("fl_ser.if_set"):
    OmegaConf.register_new_resolver("fl_ser.if_set", lambda value, then, otherwise: then if value else otherwise)
