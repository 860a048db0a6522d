"""fl-ser's entry points (train, simulation, deployment, lab, crossval, bench, soak).

Importing the package registers the config resolver ``fl_ser.first`` (the first argument that is set):
``conf/config.yaml`` names the run dir ``${fl_ser.first:${resume},outputs/DATE/TIME}``, so a resume logs into its
run's own dir. OmegaConf's ``oc.select`` would not do: it returns a key's null as it is.
"""

from omegaconf import OmegaConf

if not OmegaConf.has_resolver("fl_ser.first"):
    OmegaConf.register_new_resolver("fl_ser.first", lambda *values: next((v for v in values if v), None))
