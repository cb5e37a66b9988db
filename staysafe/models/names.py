"""The names of the models StaySafe knows, defined once (a local directory or a hub id works wherever these do)."""

ALIGNED = "smollm2-135m-aligned"  # the default safe reference, shipped (staysafe.models.aligned)
INSTRUCT = "smollm2-135m-instruct"  # the embedded model it was aligned from (staysafe.models.embedded)
ALIGNED_VACCINE = "smollm2-135m-aligned-vaccine"  # built locally by `staysafe align --defense vaccine`, not shipped
TINY = "tiny"  # a random-weight test model with the real tokenizer (it answers nothing)
MODELS = (ALIGNED, INSTRUCT, TINY, ALIGNED_VACCINE)
