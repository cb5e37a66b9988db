"""Published defenses' machinery (their methods are in :mod:`staysafe.methods`): Lisa's schedule, Vaccine's
alignment trainer, Safe LoRA's projection."""
